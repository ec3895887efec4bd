"""Run a bare-metal M-mode RISC-V program on one hart, for CPU tests.

The program is an ELF linked at 0x8000_0000 (like riscv-tests' `env/p`
programs) and reports through the HTIF `tohost` word: writing
`(code << 1) | 1` ends the run with exit code `code`.  No devices: just RAM,
a hart and the translation engine, so privileged behaviour (traps,
delegation, paging, A/D updates) can be tested in isolation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pyvirt.clock import Clock
from pyvirt.cpu.riscv.engine import Engine
from pyvirt.cpu.riscv.hart import Hart
from pyvirt.machine.elf import parse_elf
from pyvirt.memory import Bus

RAM_BASE = 0x8000_0000
RAM_SIZE = 64 << 20


@dataclass
class BareRunResult:
    exit_code: int | None
    console: bytes
    instructions: int
    regs: list[int] = field(default_factory=list)
    hart: Hart | None = None


def run_bare(path: str | Path, engine: str = "jit", max_instructions: int = 20_000_000,
             hot: int = 2) -> BareRunResult:
    image = parse_elf(Path(path).read_bytes(), str(path))
    bus = Bus(RAM_BASE, RAM_SIZE)
    for seg in image.segments:
        bus.write_bytes(seg.paddr, seg.data)
        if seg.memsz > len(seg.data):
            bus.write_bytes(seg.paddr + len(seg.data), bytes(seg.memsz - len(seg.data)))
    tohost = image.symbols.get("tohost")
    if tohost is None:
        raise ValueError(f"{path} has no tohost symbol")
    hart = Hart(0, bus, Clock(), native_regs=engine == "native")
    eng = Engine(bus, engine, hot=hot)
    eng.add_hart(hart)
    result: dict[str, int] = {}
    console = bytearray()

    def on_tohost(addr: int, length: int) -> None:
        value = bus.read(tohost, 8)
        if not value:
            return
        if value >> 56 == 1 and (value >> 48) & 0xFF == 1:
            console.append(value & 0xFF)
            bus.ram[tohost - RAM_BASE:tohost - RAM_BASE + 8] = bytes(8)
        elif value & 1:
            result["code"] = (value & ((1 << 48) - 1)) >> 1

    bus.watch(tohost >> 12, on_tohost)
    hart.pc = image.entry
    total = 0
    while total < max_instructions and "code" not in result:
        total += eng.run(hart, min(50_000, max_instructions - total))
        if hart.idle and not hart.mip & hart.mie:
            break
    return BareRunResult(result.get("code"), bytes(console), total, list(hart.x), hart)
