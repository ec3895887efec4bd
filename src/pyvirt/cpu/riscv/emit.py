"""Code emitters: how instruction templates become Python source.

An instruction's semantics are written once, as a template in `isa.py`, in
terms of an emitter `e` (its operands `e.rs1`, `e.imm`, ..., and actions
`e.rd_set()`, `e.load()`, `e.jump()`, ...).  Two emitters turn templates into
code:

* `GenericEmitter` makes one *handler* per instruction kind, compiled once at
  import, that reads its operand fields at run time.  The interpreter tier
  runs these.  Memory accesses always take the hart's checked slow path.
* `BlockEmitter` makes the body of a translated basic block: operands are
  constants, guest registers live in Python locals (loaded on entry, written
  back on exit and before anything that may trap), and memory accesses go
  through the software TLB straight to the RAM buffer.

State is precise: before any call that may raise a `Trap` the emitted code
stores `h.pc` and every register written so far, exactly what the interpreter
would have in `h.x` at that point.
"""

from __future__ import annotations

M64 = "0xFFFFFFFFFFFFFFFF"
SIGN64 = "0x8000000000000000"

_LOAD_FMT = {(1, False): "LBU", (1, True): "LB", (2, False): "LHU", (2, True): "LH",
             (4, False): "LWU", (4, True): "LW", (8, False): "LD", (8, True): "LD"}
_STORE_FMT = {1: "SB", 2: "SH", 4: "SW", 8: "SD"}
_STORE_MASK = {1: "0xFF", 2: "0xFFFF", 4: "0xFFFFFFFF", 8: None}


def sx32(expr: str) -> str:
    """Sign-extend the low 32 bits of `expr` to a 64-bit unsigned value."""
    return f"(((({expr}) & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000) & {M64}"


def signed(expr: str) -> str:
    """The 64-bit unsigned `expr` as a signed Python int."""
    return f"(({expr}) ^ {SIGN64}) - {SIGN64}"


class Emitter:
    """What templates see; subclasses decide how operands and actions look."""

    static = False   # operand values known at emission time?

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.indent = 1
        self._tmp = 0
        self.ended = False

    def line(self, code: str) -> None:
        self.lines.append("    " * self.indent + code)

    def tmp(self, prefix: str = "t") -> str:
        self._tmp += 1
        return f"{prefix}{self._tmp}"

    # Implemented by subclasses --------------------------------------------
    rs1: str
    rs2: str
    imm: str
    uimm: str
    pc: str
    npc: str
    csr: str
    rd_idx: str
    rs1_idx: str
    rm_field: str
    f1: str
    f2: str
    f3: str

    def rd_set(self, expr: str) -> None:
        raise NotImplementedError

    def fd_set(self, expr: str) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError

    def load(self, size: int, is_signed: bool, addr: str) -> str:
        raise NotImplementedError

    def store(self, size: int, addr: str, value: str) -> None:
        raise NotImplementedError

    def jump(self, target: str) -> None:
        raise NotImplementedError

    def branch(self, cond: str, target: str) -> None:
        raise NotImplementedError

    # Shared actions ----------------------------------------------------------
    def call(self, expr: str) -> str:
        """Evaluate `expr` (which may trap) after making state precise."""
        self.sync()
        t = self.tmp()
        self.line(f"{t} = {expr}")
        return t

    def do(self, stmt: str) -> None:
        """Run a statement that may trap, after making state precise."""
        self.sync()
        self.line(stmt)

    def exit_call(self, expr: str) -> None:
        """End the block: `expr` (a hart helper) returns the next pc."""
        self.sync()
        self.line(f"return {expr}")
        self.ended = True

    def trap(self, cause: str, tval: str) -> None:
        self.sync()
        self.line(f"raise Trap({cause}, {tval})")
        self.ended = True

    def fp_check(self) -> None:
        """Illegal instruction when mstatus.FS is Off (priv spec 3.1.6.6)."""
        self.line("if not h.mstatus & 0x6000:")
        self.indent += 1
        self.sync()
        self.line(f"raise Trap(2, {self.raw})")
        self.indent -= 1

    raw: str


class GenericEmitter(Emitter):
    """Emits an interpreter handler `def op_NAME(h, d)` for one instruction kind."""

    rs1 = "X[rs1]"
    rs2 = "X[rs2]"
    imm = "imm"
    uimm = f"(imm & {M64})"
    pc = "pc"
    npc = "(pc + ln)"
    csr = "imm"
    rd_idx = "rd"
    rs1_idx = "rs1"
    rm_field = "rm"
    raw = "raw"
    f1 = "F[rs1]"
    f2 = "F[rs2]"
    f3 = "F[rs3]"

    def rd_set(self, expr: str) -> None:
        self.line(f"X[rd] = {expr}")
        self.line("X[0] = 0")

    def fd_set(self, expr: str) -> None:
        self.line(f"F[rd] = {expr}")
        self.line("h.mstatus |= 0x6000")

    def sync(self) -> None:
        self.line("h.pc = pc")

    def load(self, size: int, is_signed: bool, addr: str) -> str:
        self.sync()
        t = self.tmp()
        self.line(f"{t} = h.load({addr}, {size}, {is_signed})")
        return t

    def store(self, size: int, addr: str, value: str) -> None:
        self.sync()
        self.line(f"h.store({addr}, {size}, {value})")

    def jump(self, target: str) -> None:
        self.line(f"return {target}")
        self.ended = True

    def branch(self, cond: str, target: str) -> None:
        self.line(f"if {cond}:")
        self.line(f"    return {target}")
        self.ended = True

    def function(self, name: str) -> str:
        head = [f"def {name}(h, d):",
                "    _h, rd, rs1, rs2, rs3, imm, rm, ln, raw, pc = d",
                "    X = h.x",
                "    F = h.f"]
        return "\n".join(head + self.lines + ["    return None"])


class BlockEmitter(Emitter):
    """Emits the straight-line body of a translated block, operands constant."""

    static = True

    def __init__(self) -> None:
        super().__init__()
        self.loaded: set[int] = set()      # registers read before written: loaded on entry
        self.written: set[int] = set()     # registers assigned so far
        self.uses_r = False
        self.uses_w = False
        self.uses_f = False
        self.n = 0

    def begin(self, insn: object, pc: int) -> None:
        """Point the emitter at the next instruction of the block."""
        self.ins = insn
        self._pc = pc
        rd, rs1, rs2, rs3, imm = insn.rd, insn.rs1, insn.rs2, insn.rs3, insn.imm  # type: ignore[attr-defined]
        self._rd = rd
        self.rs1 = self._read(rs1)
        self.rs2 = self._read(rs2)
        self.imm = repr(imm)
        self.uimm = hex(imm & 0xFFFFFFFFFFFFFFFF)
        self.pc = hex(pc)
        self.npc = hex((pc + insn.length) & 0xFFFFFFFFFFFFFFFF)  # type: ignore[attr-defined]
        self.csr = hex(imm)
        self.rd_idx = str(rd)
        self.rs1_idx = str(rs1)
        self.rm_field = str(insn.rm)  # type: ignore[attr-defined]
        self.raw = hex(insn.raw)  # type: ignore[attr-defined]
        self.f1 = f"F[{rs1}]"
        self.f2 = f"F[{rs2}]"
        self.f3 = f"F[{rs3}]"
        self.n += 1

    def _read(self, r: int) -> str:
        if r == 0:
            return "0"
        if r not in self.written:
            self.loaded.add(r)
        return f"x{r}"

    def rd_set(self, expr: str) -> None:
        rd = self._rd
        if rd == 0:
            return
        self.line(f"x{rd} = {expr}")
        self.written.add(rd)

    def fd_set(self, expr: str) -> None:
        self.uses_f = True
        self.line(f"F[{self._rd}] = {expr}")
        self.line("h.mstatus |= 0x6000")

    def _writeback(self) -> None:
        for r in sorted(self.written):
            self.line(f"X[{r}] = x{r}")

    def sync(self) -> None:
        self._writeback()
        self.line(f"h.pc = {self.pc}")

    def load(self, size: int, is_signed: bool, addr: str) -> str:
        self.uses_r = True
        a, o, t = self.tmp("a"), self.tmp("o"), self.tmp("v")
        self.line(f"{a} = {addr}")
        self.line(f"{o} = R.get({a} >> 12)")
        if size == 1:
            self.line(f"if {o} is None:")
        else:
            self.line(f"if {o} is None or {a} & 0xFFF > {4096 - size}:")
        self.indent += 1
        self.sync()
        self.line(f"{t} = h.load({a}, {size}, {is_signed})")
        self.indent -= 1
        self.line("else:")
        fetch = f"{_LOAD_FMT[size, is_signed]}(ram, {a} + {o})[0]"
        if is_signed and size < 8:
            fetch += f" & {M64}"
        self.line(f"    {t} = {fetch}")
        return t

    def store(self, size: int, addr: str, value: str) -> None:
        self.uses_w = True
        a, o, v = self.tmp("a"), self.tmp("o"), self.tmp("s")
        self.line(f"{a} = {addr}")
        mask = _STORE_MASK[size]
        self.line(f"{v} = {value}" if mask is None else f"{v} = ({value}) & {mask}")
        self.line(f"{o} = W.get({a} >> 12)")
        if size == 1:
            self.line(f"if {o} is None:")
        else:
            self.line(f"if {o} is None or {a} & 0xFFF > {4096 - size}:")
        self.indent += 1
        self.sync()
        self.line(f"h.store({a}, {size}, {v})")
        self.indent -= 1
        self.line("else:")
        self.line(f"    {_STORE_FMT[size]}(ram, {a} + {o}, {v})")

    def jump(self, target: str) -> None:
        t = self.tmp()
        self.line(f"{t} = {target}")
        self._writeback()
        self.line(f"return {t}")
        self.ended = True

    def branch(self, cond: str, target: str) -> None:
        c = self.tmp("c")
        self.line(f"{c} = {cond}")
        self._writeback()
        self.line(f"return {target} if {c} else {self.npc}")
        self.ended = True

    def exit_call(self, expr: str) -> None:
        super().exit_call(expr)

    def function(self, name: str, end_pc: int) -> str:
        head = [f"def {name}(h):", "    X = h.x"]
        if self.uses_r:
            head.append("    R = h.rtlb")
        if self.uses_w:
            head.append("    W = h.wtlb")
        body = "\n".join(self.lines)
        if "F[" in body:
            head.append("    F = h.f")
        for r in sorted(self.loaded):
            head.append(f"    x{r} = X[{r}]")
        tail: list[str] = []
        if not self.ended:
            for r in sorted(self.written):
                tail.append(f"    X[{r}] = x{r}")
            tail.append(f"    return {hex(end_pc)}")
        return "\n".join(head + self.lines + tail)
