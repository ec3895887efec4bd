"""Run a static RISC-V Linux user program on one hart, for CPU tests.

The program runs in U-mode with translation off (RAM from address 0), and
the few Linux system calls a freestanding test program uses are served here:
write, exit, exit_group.  Any trap that is not an ecall stops the run and is
reported (`UserRunResult.fault`), which is what tests of faulting code want.

The same ELF runs under qemu-riscv64, so results can be compared one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pyvirt.clock import Clock
from pyvirt.cpu.riscv.engine import Engine
from pyvirt.cpu.riscv.hart import Hart
from pyvirt.cpu.riscv.traps import StopSlice
from pyvirt.machine.elf import parse_elf
from pyvirt.memory import Bus

RAM_SIZE = 64 << 20
STACK_TOP = RAM_SIZE - 0x10000
TRAP_STUB = RAM_SIZE - 0x1000          # M-mode trap vector: a `wfi` that stops the run
WFI = 0x10500073

SYS_WRITE, SYS_EXIT, SYS_EXIT_GROUP = 64, 93, 94


@dataclass
class UserRunResult:
    exit_code: int | None
    stdout: bytes
    stderr: bytes
    instructions: int
    fault: tuple[int, int, int] | None = None     # (mcause, mepc, mtval)
    regs: list[int] = field(default_factory=list)
    fregs: list[int] = field(default_factory=list)
    engine_stats: dict[str, int] = field(default_factory=dict)


class _Syscalls:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.out = {1: bytearray(), 2: bytearray()}
        self.exit_code: int | None = None

    def __call__(self, h: Hart) -> bool:
        if h.priv != 0:
            return False
        nr, a0, a1, a2 = h.x[17], h.x[10], h.x[11], h.x[12]
        if nr == SYS_WRITE:
            buf = self.out.get(a0)
            if buf is None or not self.bus.is_ram(a1, a2):
                h.x[10] = (-9 if buf is None else -14) & ((1 << 64) - 1)   # EBADF / EFAULT
            else:
                buf += self.bus.read_bytes(a1, a2)
                h.x[10] = a2
            return True
        if nr in (SYS_EXIT, SYS_EXIT_GROUP):
            self.exit_code = a0 & 0xFF
            h.pc = (h.pc + 4) & ((1 << 64) - 1)
            raise StopSlice()
        h.x[10] = (-38) & ((1 << 64) - 1)                            # ENOSYS
        return True


def run_elf(path: str | Path, engine: str = "jit", max_instructions: int = 50_000_000,
            hot: int = 2) -> UserRunResult:
    image = parse_elf(Path(path).read_bytes(), str(path))
    bus = Bus(0, RAM_SIZE)
    for seg in image.segments:
        if seg.vaddr + seg.memsz > TRAP_STUB:
            raise ValueError("test program does not fit in the user-mode test RAM")
        bus.write_bytes(seg.vaddr, seg.data)
    bus.write(TRAP_STUB, 4, WFI)
    hart = Hart(0, bus, Clock(), native_regs=engine == "native")
    eng = Engine(bus, engine, hot=hot)
    eng.add_hart(hart)
    sys = _Syscalls(bus)
    hart.ecall_hook = sys
    hart.mtvec = TRAP_STUB
    hart.mstatus |= 1 << 13            # FS = Initial: user code may use the FPU
    hart.mcounteren = hart.scounteren = 7
    hart.set_priv(0)
    hart.pc = image.entry
    hart.x[2] = STACK_TOP
    total = 0
    fault = None
    while total < max_instructions and sys.exit_code is None:
        total += eng.run(hart, min(100_000, max_instructions - total))
        if hart.priv == 3:
            fault = (hart.mcause, hart.mepc, hart.mtval)
            break
    return UserRunResult(sys.exit_code, bytes(sys.out[1]), bytes(sys.out[2]), total, fault,
                         list(hart.x), list(hart.f), dict(eng.stats))
