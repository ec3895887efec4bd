"""The Supervisor Binary Interface, served by the VMM itself (SBI spec v2.0).

With no firmware, an S-mode `ecall` reaches this class instead of M-mode
code.  Extensions: Base, legacy (console putchar/getchar, timer, IPI,
fences, shutdown), TIME, IPI, RFENCE, HSM, SRST and DBCN.  Arguments are in
a0-a5, the extension in a7 and the function in a6; results in a0 (error) and
a1 (value), per the SBI calling convention (chapter 3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from pyvirt.cpu.riscv.csr import SSIP, STIP
from pyvirt.cpu.riscv.hart import HART_STARTED, HART_STOPPED, Hart
from pyvirt.cpu.riscv.traps import StopSlice

M64 = (1 << 64) - 1

SBI_SUCCESS = 0
SBI_ERR_FAILED = -1
SBI_ERR_NOT_SUPPORTED = -2
SBI_ERR_INVALID_PARAM = -3
SBI_ERR_INVALID_ADDRESS = -5
SBI_ERR_ALREADY_AVAILABLE = -6
SBI_ERR_ALREADY_STOPPED = -8

EXT_BASE = 0x10
EXT_TIME = 0x54494D45
EXT_IPI = 0x735049
EXT_RFENCE = 0x52464E43
EXT_HSM = 0x48534D
EXT_SRST = 0x53525354
EXT_DBCN = 0x4442434E
LEGACY = range(0x00, 0x09)

SPEC_VERSION = 2 << 24          # v2.0
IMPL_ID = 0x7079                # not a registered implementation ID
IMPL_VERSION = 1


class Platform(Protocol):
    """What the SBI needs from the machine."""

    @property
    def harts(self) -> Sequence[Hart]: ...

    def console_write(self, data: bytes) -> None: ...

    def console_read(self) -> int: ...

    def system_reset(self, reset_type: int, reason: int) -> None: ...

    def guest_read(self, addr: int, length: int) -> bytes | None: ...


class Sbi:
    def __init__(self, platform: Platform) -> None:
        self.p = platform
        self._ext: dict[int, Callable[[Hart, int], tuple[int, int]]] = {
            EXT_BASE: self._base, EXT_TIME: self._time, EXT_IPI: self._ipi,
            EXT_RFENCE: self._rfence, EXT_HSM: self._hsm, EXT_SRST: self._srst,
            EXT_DBCN: self._dbcn,
        }

    def __call__(self, h: Hart) -> bool:
        """The hart's ecall hook: serve ecalls from S-mode."""
        if h.priv != 1:
            return False
        x = h.x
        eid = x[17]
        if eid in LEGACY:
            x[10] = self._legacy(h, eid) & M64
            return True
        fn = self._ext.get(eid)
        if fn is None:
            err, val = SBI_ERR_NOT_SUPPORTED, 0
        else:
            err, val = fn(h, x[16])
        x[10] = err & M64
        x[11] = val & M64
        return True

    # -- helpers ---------------------------------------------------------------
    def _targets(self, mask: int, base: int) -> list[Hart] | None:
        harts = self.p.harts
        if base == M64:
            return list(harts)
        out = []
        for i in range(64):
            if mask >> i & 1:
                hid = base + i
                if hid >= len(harts):
                    return None
                out.append(harts[hid])
        return out

    def _set_timer(self, h: Hart, when: int) -> None:
        h.stimecmp = when
        h.set_irq(STIP, False)

    # -- extensions ----------------------------------------------------------------
    def _base(self, h: Hart, fid: int) -> tuple[int, int]:
        if fid == 0:
            return SBI_SUCCESS, SPEC_VERSION
        if fid == 1:
            return SBI_SUCCESS, IMPL_ID
        if fid == 2:
            return SBI_SUCCESS, IMPL_VERSION
        if fid == 3:
            eid = h.x[10]
            return SBI_SUCCESS, int(eid in self._ext or eid in LEGACY)
        if fid in (4, 5, 6):
            return SBI_SUCCESS, 0       # mvendorid, marchid, mimpid
        return SBI_ERR_NOT_SUPPORTED, 0

    def _time(self, h: Hart, fid: int) -> tuple[int, int]:
        if fid != 0:
            return SBI_ERR_NOT_SUPPORTED, 0
        self._set_timer(h, h.x[10])
        return SBI_SUCCESS, 0

    def _ipi(self, h: Hart, fid: int) -> tuple[int, int]:
        if fid != 0:
            return SBI_ERR_NOT_SUPPORTED, 0
        targets = self._targets(h.x[10], h.x[11])
        if targets is None:
            return SBI_ERR_INVALID_PARAM, 0
        for t in targets:
            t.set_irq(SSIP, True)
        return SBI_SUCCESS, 0

    def _rfence(self, h: Hart, fid: int) -> tuple[int, int]:
        if fid > 2:
            return SBI_ERR_NOT_SUPPORTED, 0
        targets = self._targets(h.x[10], h.x[11])
        if targets is None:
            return SBI_ERR_INVALID_PARAM, 0
        if fid != 0:    # fence.i needs nothing: stores invalidate translated code
            x = h.x
            asid = x[14] & 0xFFFF if fid == 2 else None
            for t in targets:
                t.sfence_range(x[12], x[13], asid)
        return SBI_SUCCESS, 0

    def _hsm(self, h: Hart, fid: int) -> tuple[int, int]:
        harts = self.p.harts
        x = h.x
        if fid == 0:                                      # hart_start
            hid = x[10]
            if hid >= len(harts):
                return SBI_ERR_INVALID_PARAM, 0
            t = harts[hid]
            if t.state != HART_STOPPED:
                return SBI_ERR_ALREADY_AVAILABLE, 0
            t.reset()
            t.mideleg, t.medeleg = h.mideleg, h.medeleg
            t.mcounteren, t.scounteren = h.mcounteren, 7
            t.menvcfg = h.menvcfg
            t.ecall_hook = h.ecall_hook
            t.set_priv(1)
            t.pc = x[11]
            t.x[10], t.x[11] = hid, x[12]
            t.state = HART_STARTED
            return SBI_SUCCESS, 0
        if fid == 1:                                      # hart_stop
            h.state = HART_STOPPED
            h.pc = (h.pc + 4) & M64
            raise StopSlice()
        if fid == 2:                                      # hart_get_status
            hid = x[10]
            if hid >= len(harts):
                return SBI_ERR_INVALID_PARAM, 0
            return SBI_SUCCESS, 0 if harts[hid].state == HART_STARTED else 1
        if fid == 3:                                      # hart_suspend
            kind = x[10] & 0xFFFFFFFF
            if kind == 0:                                 # default retentive: like WFI
                x[10] = SBI_SUCCESS
                h.pc = (h.pc + 4) & M64
                if not h.mip & h.mie:
                    h.idle = True
                raise StopSlice()
            if kind == 0x80000000:                        # default non-retentive
                resume, opaque = x[11], x[12]
                h.pc = resume
                h.x[10], h.x[11] = h.hartid, opaque
                h.mstatus &= ~0x2                         # SIE = 0
                h.satp = 0
                h.flush_tlb()       # (the mode changes: every address space goes)
                if not h.mip & h.mie:
                    h.idle = True
                raise StopSlice()
            return SBI_ERR_INVALID_PARAM, 0
        return SBI_ERR_NOT_SUPPORTED, 0

    def _srst(self, h: Hart, fid: int) -> tuple[int, int]:
        if fid != 0:
            return SBI_ERR_NOT_SUPPORTED, 0
        kind, reason = h.x[10] & 0xFFFFFFFF, h.x[11] & 0xFFFFFFFF
        if kind > 2 or reason > 1 and reason < 0xE0000000:
            return SBI_ERR_INVALID_PARAM, 0
        self.p.system_reset(kind, reason)
        h.pc = (h.pc + 4) & M64
        raise StopSlice()

    def _dbcn(self, h: Hart, fid: int) -> tuple[int, int]:
        x = h.x
        if fid == 0:                                      # write(num, base_lo, base_hi)
            data = self.p.guest_read(x[11] | (x[12] << 32), x[10])
            if data is None:
                return SBI_ERR_INVALID_PARAM, 0
            self.p.console_write(data)
            return SBI_SUCCESS, len(data)
        if fid == 1:                                      # read: no input through DBCN
            return SBI_SUCCESS, 0
        if fid == 2:                                      # write_byte
            self.p.console_write(bytes([x[10] & 0xFF]))
            return SBI_SUCCESS, 0
        return SBI_ERR_NOT_SUPPORTED, 0

    def _legacy(self, h: Hart, eid: int) -> int:
        x = h.x
        if eid == 0x00:
            self._set_timer(h, x[10])
            return 0
        if eid == 0x01:
            self.p.console_write(bytes([x[10] & 0xFF]))
            return 0
        if eid == 0x02:
            return self.p.console_read()
        if eid == 0x03:
            h.set_irq(SSIP, False)
            return 0
        if eid in (0x04, 0x05, 0x06, 0x07):
            raw = self.p.guest_read(x[10], 8) if x[10] else None
            mask = int.from_bytes(raw, "little") if raw else 0
            targets = self._targets(mask, 0) or []
            for t in targets:
                if eid == 0x04:
                    t.set_irq(SSIP, True)
                elif eid != 0x05:
                    t.flush_tlb()
            return 0
        # 0x08: shutdown
        self.p.system_reset(0, 0)
        h.pc = (h.pc + 4) & M64
        raise StopSlice()
