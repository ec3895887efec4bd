"""Control and status registers (privileged spec 1.12, chapters 2, 3 and 4).

A mixin for `Hart`: `csr_read()` serves the pure reads the translator emits
for `csrr`, `csr_op()` the read-modify-write instructions.  Unknown CSRs and
insufficient privilege raise an illegal-instruction trap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyvirt.cpu.riscv.traps import ILLEGAL_INSN, ContextChange, Trap

if TYPE_CHECKING:
    from pyvirt.cpu.riscv.hart import Hart

M64 = (1 << 64) - 1
ASID_MASK = 0xFFFF          # ASIDLEN = 16: every satp.ASID bit is writable

# mstatus fields (3.1.6)
SIE, MIE, SPIE, UBE, MPIE, SPP = 1 << 1, 1 << 3, 1 << 5, 1 << 6, 1 << 7, 1 << 8
MPP_SHIFT = 11
MPP = 3 << MPP_SHIFT
FS = 3 << 13
MPRV, SUM, MXR, TVM, TW, TSR = 1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22
UXL_SXL = (2 << 32) | (2 << 34)       # XLEN=64 for U and S, read-only
SD = 1 << 63

MSTATUS_WRITABLE = SIE | MIE | SPIE | MPIE | SPP | MPP | FS | MPRV | SUM | MXR | TVM | TW | TSR
SSTATUS_MASK = SIE | SPIE | UBE | SPP | FS | SUM | MXR | UXL_SXL | SD

# mip/mie bits
SSIP, MSIP, STIP, MTIP, SEIP, MEIP = 1 << 1, 1 << 3, 1 << 5, 1 << 7, 1 << 9, 1 << 11
S_INTERRUPTS = SSIP | STIP | SEIP
ALL_INTERRUPTS = S_INTERRUPTS | MSIP | MTIP | MEIP
MIP_WRITABLE = SSIP | STIP | SEIP

# menvcfg (3.1.18): STCE enables Sstc's stimecmp (the other fields are read-only zero)
STCE = 1 << 63

# misa: RV64 with I M A F D C S U
MISA = (2 << 62) | sum(1 << (ord(c) - ord("A")) for c in "IMAFDCSU")

# medeleg: every exception except ecall from M-mode can be delegated
MEDELEG_WRITABLE = 0xB3FF & ~(1 << 11)


def _illegal(h: Hart) -> Trap:
    return Trap(ILLEGAL_INSN, 0)


class CsrMixin:
    """CSR access for a Hart.  Attributes live in Hart.__slots__."""

    def csr_read(self: Any, num: int) -> int:
        if (num >> 8) & 3 > self.priv:
            raise Trap(ILLEGAL_INSN, 0)
        get = _GETTERS.get(num)
        if get is None:
            raise Trap(ILLEGAL_INSN, 0)
        return get(self) & M64

    def csr_op(self: Any, num: int, op: int, src: int, rs1: int, rd: int, npc: int) -> int:
        """csrrw/csrrs/csrrc (op 1/2/3) and their immediate forms; returns the next pc."""
        write = op == 1 or rs1 != 0
        if (num >> 8) & 3 > self.priv or (write and num >> 10 == 3):
            raise Trap(ILLEGAL_INSN, 0)
        get = _GETTERS.get(num)
        if get is None:
            raise Trap(ILLEGAL_INSN, 0)
        old = get(self) & M64
        tlbs = self.tlbs
        if write:
            new = src if op == 1 else (old | src) if op == 2 else (old & ~src)
            _SETTERS[num](self, new & M64)
        if rd:
            self.x[rd] = old
        self.pc = npc
        if write:
            self.interrupt_now()
            if self.tlbs is not tlbs:
                # A satp write switched address spaces: the dispatcher re-reads the
                # fetch TLB (this is always a block's last instruction).
                raise ContextChange()
        return npc


# ---------------------------------------------------------------------------
# Per-CSR behaviour
# ---------------------------------------------------------------------------
_GETTERS: dict[int, Callable[[Any], int]] = {}
_SETTERS: dict[int, Callable[[Any, int], None]] = {}


def _ignore(h: Any, v: int) -> None:
    pass


def _csr(num: int, get: Callable[[Any], int], set_: Callable[[Any, int], None] = _ignore) -> None:
    _GETTERS[num] = get
    _SETTERS[num] = set_


def _attr(num: int, name: str, mask: int = M64) -> None:
    def get(h: Any) -> int:
        return getattr(h, name)

    def set_(h: Any, v: int) -> None:
        setattr(h, name, v & mask)
    _csr(num, get, set_)


# --- floating point (require mstatus.FS != Off) ------------------------------
def _fp_guard(h: Any) -> None:
    if not h.mstatus & FS:
        raise Trap(ILLEGAL_INSN, 0)


def _fp_get(fn: Callable[[Any], int]) -> Callable[[Any], int]:
    def get(h: Any) -> int:
        _fp_guard(h)
        return fn(h)
    return get


def _fp_set(fn: Callable[[Any, int], None]) -> Callable[[Any, int], None]:
    def set_(h: Any, v: int) -> None:
        fn(h, v)
        h.mstatus |= FS
    return set_


def _set_fflags(h: Any, v: int) -> None:
    h.fflags = v & 0x1F


def _set_frm(h: Any, v: int) -> None:
    h.frm = v & 7


def _set_fcsr(h: Any, v: int) -> None:
    h.fflags = v & 0x1F
    h.frm = (v >> 5) & 7


_csr(0x001, _fp_get(lambda h: h.fflags), _fp_set(_set_fflags))
_csr(0x002, _fp_get(lambda h: h.frm), _fp_set(_set_frm))
_csr(0x003, _fp_get(lambda h: (h.frm << 5) | h.fflags), _fp_set(_set_fcsr))


# --- counters (Zicntr) ----------------------------------------------------------
def _counter(bit: int, fn: Callable[[Any], int]) -> Callable[[Any], int]:
    def get(h: Any) -> int:
        if h.priv < 3 and not (h.mcounteren >> bit) & 1:
            raise Trap(ILLEGAL_INSN, 0)
        if h.priv == 0 and not (h.scounteren >> bit) & 1:
            raise Trap(ILLEGAL_INSN, 0)
        return fn(h)
    return get


_csr(0xC00, _counter(0, lambda h: h.instret))
_csr(0xC01, _counter(1, lambda h: h.clock.ticks()))
_csr(0xC02, _counter(2, lambda h: h.instret))
for _i in range(3, 32):
    _csr(0xC00 + _i, _counter(_i, lambda h: 0))
    _csr(0xB00 + _i, lambda h: 0)           # mhpmcounterN
    _csr(0x320 + _i, lambda h: 0)           # mhpmeventN


def _set_instret(h: Any, v: int) -> None:
    h.instret = v


_csr(0xB00, lambda h: h.instret, _set_instret)   # mcycle
_csr(0xB02, lambda h: h.instret, _set_instret)   # minstret
_attr(0x320, "mcountinhibit", 0xFFFFFFFD)


# --- status ------------------------------------------------------------------------
def _mstatus_get(h: Any) -> int:
    v = h.mstatus | UXL_SXL
    if v & FS == FS:
        v |= SD
    return v


def _mstatus_set(h: Any, v: int) -> None:
    old = h.mstatus
    new = (old & ~MSTATUS_WRITABLE) | (v & MSTATUS_WRITABLE)
    if (new & MPP) >> MPP_SHIFT == 2:             # WARL: 2 is reserved
        new = (new & ~MPP) | (old & MPP)
    h.mstatus = new
    h.status_changed(old, new)


def _sstatus_get(h: Any) -> int:
    return _mstatus_get(h) & SSTATUS_MASK


def _sstatus_set(h: Any, v: int) -> None:
    writable = SIE | SPIE | SPP | FS | SUM | MXR
    old = h.mstatus
    new = (old & ~writable) | (v & writable)
    h.mstatus = new
    h.status_changed(old, new)


_csr(0x300, _mstatus_get, _mstatus_set)
_csr(0x100, _sstatus_get, _sstatus_set)
_csr(0x301, lambda h: MISA)                       # misa: writes ignored (WARL)
_attr(0x302, "medeleg", MEDELEG_WRITABLE)
_attr(0x303, "mideleg", S_INTERRUPTS)


# --- interrupts ----------------------------------------------------------------------
def _mie_set(h: Any, v: int) -> None:
    h.mie = v & ALL_INTERRUPTS


def _mip_set(h: Any, v: int) -> None:
    # With Sstc enabled STIP is the comparator's (time >= stimecmp), read-only.
    writable = MIP_WRITABLE & ~STIP if h.menvcfg & STCE else MIP_WRITABLE
    h.mip = (h.mip & ~writable) | (v & writable)


def _mip_get(h: Any) -> int:
    if h.menvcfg & STCE:
        h.timer_compare()
    return h.mip


def _sie_set(h: Any, v: int) -> None:
    h.mie = (h.mie & ~h.mideleg) | (v & h.mideleg)


def _sip_set(h: Any, v: int) -> None:
    writable = SSIP & h.mideleg
    h.mip = (h.mip & ~writable) | (v & writable)


_csr(0x304, lambda h: h.mie, _mie_set)
_csr(0x344, _mip_get, _mip_set)
_csr(0x104, lambda h: h.mie & h.mideleg, _sie_set)
_csr(0x144, lambda h: _mip_get(h) & h.mideleg, _sip_set)


# --- Sstc: the supervisor timer compare ------------------------------------------------
def _stimecmp_guard(h: Any) -> None:
    """From S-mode only with menvcfg.STCE and mcounteren.TM (Sstc 1.0)."""
    if h.priv < 3 and not (h.menvcfg & STCE and h.mcounteren & 2):
        raise Trap(ILLEGAL_INSN, 0)


def _stimecmp_get(h: Any) -> int:
    _stimecmp_guard(h)
    return h.stimecmp


def _stimecmp_set(h: Any, v: int) -> None:
    _stimecmp_guard(h)
    h.stimecmp = v
    if h.menvcfg & STCE:
        h.timer_compare()


_csr(0x14D, _stimecmp_get, _stimecmp_set)


# --- trap setup and handling ---------------------------------------------------------
def _tvec_mask(v: int) -> int:
    return v & ~2 & M64          # modes 0 (direct) and 1 (vectored); 2-3 reserved


def _set_mtvec(h: Any, v: int) -> None:
    h.mtvec = _tvec_mask(v)


def _set_stvec(h: Any, v: int) -> None:
    h.stvec = _tvec_mask(v)


_csr(0x305, lambda h: h.mtvec, _set_mtvec)
_csr(0x105, lambda h: h.stvec, _set_stvec)
_attr(0x306, "mcounteren", 0xFFFFFFFF)
_attr(0x106, "scounteren", 0xFFFFFFFF)
_attr(0x30A, "menvcfg", STCE)
_attr(0x10A, "senvcfg", 0)
_attr(0x340, "mscratch")
_attr(0x140, "sscratch")
_attr(0x341, "mepc", ~1 & M64)
_attr(0x141, "sepc", ~1 & M64)
_attr(0x342, "mcause")
_attr(0x142, "scause")
_attr(0x343, "mtval")
_attr(0x143, "stval")


# --- address translation ---------------------------------------------------------------
def _satp_get(h: Any) -> int:
    if h.priv == 1 and h.mstatus & TVM:
        raise Trap(ILLEGAL_INSN, 0)
    return h.satp


def _satp_set(h: Any, v: int) -> None:
    if h.priv == 1 and h.mstatus & TVM:
        raise Trap(ILLEGAL_INSN, 0)
    mode = v >> 60
    if mode not in (0, 8, 9):
        return                      # unsupported mode: the write has no effect
    h.write_satp(v & ((0xF << 60) | (ASID_MASK << 44) | ((1 << 44) - 1)))


_csr(0x180, _satp_get, _satp_set)

# --- machine information ---------------------------------------------------------------
_csr(0xF11, lambda h: 0)            # mvendorid: non-commercial implementation
_csr(0xF12, lambda h: 0)            # marchid
_csr(0xF13, lambda h: 0)            # mimpid
_csr(0xF14, lambda h: h.hartid)
_csr(0xF15, lambda h: 0)            # mconfigptr


# --- physical memory protection: registers kept, checks not enforced ------------------------
def _pmpcfg(i: int) -> None:
    def get(h: Any) -> int:
        return h.pmp[i]

    def set_(h: Any, v: int) -> None:
        h.pmp[i] = v
    _csr(0x3A0 + i, get, set_)


def _pmpaddr(i: int) -> None:
    def get(h: Any) -> int:
        return h.pmp[16 + i]

    def set_(h: Any, v: int) -> None:
        h.pmp[16 + i] = v & ((1 << 54) - 1)
    _csr(0x3B0 + i, get, set_)


for _i in range(0, 16, 2):
    _pmpcfg(_i)
for _i in range(64):
    _pmpaddr(_i)
