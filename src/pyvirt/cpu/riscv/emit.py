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


def add64(a: str, b: str) -> str:
    """`a + b` wrapped to 64 bits, simplified when an operand is the constant 0
    (mv, sext.w, zero-offset addresses: very common)."""
    if b == "0":
        return a
    if a == "0":
        return b if not b.lstrip("-").isdigit() else f"{int(b) & 0xFFFFFFFFFFFFFFFF:#x}"
    return f"({a} + {b}) & {M64}"


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
    rs2_idx: str
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

    def jump(self, target: str, direct: bool = False) -> None:
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

    def amo(self, op: str, size: int, addr: str, src: str) -> str:
        return self.call(f"h.amo({op!r}, {addr}, {src}, {size})")

    def lr(self, size: int, addr: str) -> str:
        return self.call(f"h.lr({addr}, {size})")

    def sc(self, size: int, addr: str, src: str) -> str:
        return self.call(f"h.sc({addr}, {src}, {size})")

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
    rs2_idx = "rs2"
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
        self.line(f"{t} = h.mem_load({addr}, {size}, {is_signed})")
        return t

    def store(self, size: int, addr: str, value: str) -> None:
        self.sync()
        self.line(f"h.mem_store({addr}, {size}, {value})")

    def jump(self, target: str, direct: bool = False) -> None:
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
    """Emits the body of a translated block, operands constant.

    A block may continue past conditional branches (side exits) and through
    direct jumps inside its page.  When a branch or jump leads back to the
    block's entry the body becomes a loop: registers stay in locals across
    iterations, and the loop returns to the dispatcher after LOOP_BUDGET
    instructions so interrupts and other harts still get their turn.

    Instruction accounting: the dispatcher charges the block's full length
    per call; exits adjust `h.adj` by the difference so `instret` is exact
    for blocks that complete (a trap loses the partial block's count).
    """

    static = True
    LOOP_BUDGET = 20_000

    def __init__(self, entry: int = 0, total: int = 0, loop: bool = False) -> None:
        super().__init__()
        self.entry = entry
        self.total = total
        self.loop = loop
        self.loaded: set[int] = set()
        self.written: set[int] = set()
        self.uses_r = False
        self.uses_w = False
        self.final: list[str] | None = None
        self.n = 0
        self.indent = 3

    def begin(self, insn: object, pc: int, index: int = 0, next_pc: int | None = None) -> None:
        """Point the emitter at the next instruction of the block."""
        self.ins = insn
        self._pc = pc
        self.index = index
        self.next_pc = next_pc
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
        self.rs2_idx = str(rs2)
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
        self.line(f"F[{self._rd}] = {expr}")
        self.line("h.mstatus |= 0x6000")

    def sync(self) -> None:
        # Only the pc: if the call raises, the block's exception handler stores
        # the registers, whose locals hold exactly the state at that point.
        self.line(f"h.pc = {self.pc}")

    # -- leaving the block ---------------------------------------------------------
    # Every exit sets `nxt` (the next pc) and `d` (the correction to the
    # dispatcher's charge) and breaks out of the body's `while` loop; one common
    # exit after the loop stores the registers and returns.  This keeps blocks
    # with many side exits small, which is what compile time depends on.
    def _exit(self, target: str) -> None:
        done = self.index + 1 - self.total
        self.line(f"nxt = {target}")
        self.line(f"d = {done}")
        self.line("break")

    def _leave(self, target: str) -> None:
        """Transfer to `target`: loop back to the entry, or leave the block."""
        if self.loop and target == hex(self.entry):
            self.line(f"cnt += {self.index + 1}")
            self.line(f"if cnt < {self.LOOP_BUDGET}:")
            self.line("    continue")
            self.line(f"nxt = {target}")
            self.line(f"d = {-self.total}")       # cnt already counts this iteration
            self.line("break")
            return
        self._exit(target)

    def jump(self, target: str, direct: bool = False) -> None:
        if direct:
            ins = self.ins
            static = hex((self._pc + ins.imm) & 0xFFFFFFFFFFFFFFFF)  # type: ignore[attr-defined]
            if self.next_pc is not None and static == hex(self.next_pc):
                return                       # followed inside the block
            self._leave(static)
            self.ended = True
            return
        self._leave(target)
        self.ended = True

    def branch(self, cond: str, target: str) -> None:
        ins = self.ins
        static = hex((self._pc + ins.imm) & 0xFFFFFFFFFFFFFFFF)  # type: ignore[attr-defined]
        self.line(f"if {cond}:")
        self.indent += 1
        self._leave(static)
        self.indent -= 1
        if self.next_pc is None:
            self._exit(self.npc)
            self.ended = True

    def exit_call(self, expr: str) -> None:
        # The helper reads and writes h.x itself, so it runs after the block's
        # exception handler, with the registers stored (always the last instruction).
        done = self.index + 1 - self.total
        self.final = [f"h.pc = {self.pc}"]
        if self.loop:
            self.final.append(f"h.adj += cnt + {done}")
        elif done:
            self.final.append(f"h.adj += {done}")
        self.final.append(f"return {expr}")
        self._exit("-1")
        self.ended = True

    # -- memory ---------------------------------------------------------------------
    def _tlb(self, which: str, a: str, size: int, align: bool = False) -> str:
        o = self.tmp("o")
        self.line(f"{o} = {which}.get({a} >> 12)")
        if align:
            self.line(f"if {o} is None or {a} & {size - 1}:")
        elif size == 1:
            self.line(f"if {o} is None:")
        else:
            self.line(f"if {o} is None or {a} & 0xFFF > {4096 - size}:")
        return o

    def load(self, size: int, is_signed: bool, addr: str) -> str:
        self.uses_r = True
        a, t = self.tmp("a"), self.tmp("v")
        self.line(f"{a} = {addr}")
        o = self._tlb("R", a, size)
        self.indent += 1
        self.sync()
        self.line(f"{t} = h.mem_load({a}, {size}, {is_signed})")
        self.indent -= 1
        self.line("else:")
        fetch = f"{_LOAD_FMT[size, is_signed]}(ram, {a} + {o})[0]"
        if is_signed and size < 8:
            fetch += f" & {M64}"
        self.line(f"    {t} = {fetch}")
        return t

    def store(self, size: int, addr: str, value: str) -> None:
        self.uses_w = True
        a, v = self.tmp("a"), self.tmp("s")
        self.line(f"{a} = {addr}")
        mask = _STORE_MASK[size]
        self.line(f"{v} = {value}" if mask is None else f"{v} = ({value}) & {mask}")
        o = self._tlb("W", a, size)
        self.indent += 1
        self.sync()
        self.line(f"h.mem_store({a}, {size}, {v})")
        self.indent -= 1
        self.line("else:")
        self.line(f"    {_STORE_FMT[size]}(ram, {a} + {o}, {v})")

    def amo(self, op: str, size: int, addr: str, src: str) -> str:
        self.uses_w = True
        a, b, t = self.tmp("a"), self.tmp("b"), self.tmp("v")
        self.line(f"{a} = {addr}")
        o = self._tlb("W", a, size, align=True)
        self.indent += 1
        self.sync()
        self.line(f"{t} = h.amo({op!r}, {a}, {src}, {size})")
        self.indent -= 1
        self.line("else:")
        self.indent += 1
        mask = "0xFFFFFFFF" if size == 4 else M64
        sign = "0x80000000" if size == 4 else SIGN64
        i = self.tmp("i")
        self.line(f"{i} = {a} + {o}")
        self.line(f"{b} = {src}" if size == 8 else f"{b} = {src} & 0xFFFFFFFF")
        self.line(f"{t} = {'LWU' if size == 4 else 'LD'}(ram, {i})[0]")
        new = {
            "amoswap": b, "amoadd": f"({t} + {b}) & {mask}", "amoxor": f"{t} ^ {b}",
            "amoand": f"{t} & {b}", "amoor": f"{t} | {b}",
            "amomin": f"{t} if ({t} ^ {sign}) < ({b} ^ {sign}) else {b}",
            "amomax": f"{t} if ({t} ^ {sign}) > ({b} ^ {sign}) else {b}",
            "amominu": f"{t} if {t} < {b} else {b}", "amomaxu": f"{t} if {t} > {b} else {b}",
        }[op]
        self.line(f"{'SW' if size == 4 else 'SD'}(ram, {i}, {new})")
        if size == 4:
            self.line(f"{t} = {sx32(t)}")
        self.indent -= 1
        return t

    def lr(self, size: int, addr: str) -> str:
        self.uses_r = True
        a, t = self.tmp("a"), self.tmp("v")
        self.line(f"{a} = {addr}")
        o = self._tlb("R", a, size, align=True)
        self.indent += 1
        self.sync()
        self.line(f"{t} = h.lr({a}, {size})")
        self.indent -= 1
        self.line("else:")
        self.line(f"    h.resv = {a} + {o}")
        fetch = f"LW(ram, {a} + {o})[0] & {M64}" if size == 4 else f"LD(ram, {a} + {o})[0]"
        self.line(f"    {t} = {fetch}")
        return t

    def sc(self, size: int, addr: str, src: str) -> str:
        self.uses_w = True
        a, t = self.tmp("a"), self.tmp("v")
        self.line(f"{a} = {addr}")
        o = self._tlb("W", a, size, align=True)
        self.indent += 1
        self.sync()
        self.line(f"{t} = h.sc({a}, {src}, {size})")
        self.indent -= 1
        self.line(f"elif h.resv == {a} + {o}:")
        value = src if size == 8 else f"{src} & 0xFFFFFFFF"
        self.line(f"    {'SW' if size == 4 else 'SD'}(ram, {a} + {o}, {value})")
        self.line("    h.resv = -1")
        self.line(f"    {t} = 0")
        self.line("else:")
        self.line("    h.resv = -1")
        self.line(f"    {t} = 1")
        return t

    def function(self, name: str, end_pc: int) -> str:
        head = [f"def {name}(h):", "    X = h.x"]
        if self.uses_r:
            head.append("    R = h.rtlb")
        if self.uses_w:
            head.append("    W = h.wtlb")
        body = "\n".join(self.lines)
        if "F[" in body:
            head.append("    F = h.f")
        for r in sorted(self.loaded | self.written):
            head.append(f"    x{r} = X[{r}]")
        if self.loop:
            head.append("    cnt = 0")
        head += ["    try:", "        while True:"]
        pad = "    " * self.indent
        lines = list(self.lines)
        if not self.ended:
            self.index = self.total - 1
            self.indent = 3
            self._exit(hex(end_pc))
            lines = self.lines
        wb = ["    " + line for line in ([f"X[{r}] = x{r}" for r in sorted(self.written)] or ["pass"])]
        tail = ["    except BaseException:"] + ["    " + w for w in wb] + ["        raise"] + wb
        if self.final:
            tail += ["    if nxt < 0:"] + ["        " + line for line in self.final]
        if self.loop:
            tail += ["    h.adj += cnt + d",
                     f"    return nxt if h.adj < {self.LOOP_BUDGET} else h.stop_at(nxt)"]
        else:
            tail += ["    if d:", "        h.adj += d", "    return nxt"]
        del pad
        return "\n".join(head + lines + tail)
