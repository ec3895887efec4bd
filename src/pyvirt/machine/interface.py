"""The boundary between the VMM and a board: what `vmm/vm.py` asks of a machine, and the
typed exits a slice of guest execution ends with.

A board owns its vCPUs and the engine that runs them (the riscv64 "virt" board: harts run
by `cpu/riscv`'s interp/jit/native engine).  The VMM never reads a vCPU's registers or
interrupt state; it runs the machine a slice at a time and acts on the exit:

    BudgetSpent(n)   the slice ran n instructions; run the next one after polling I/O
    Wfi()            no vCPU ran: each waits for an interrupt; sleep until the next timer
                     deadline or host input unless `interrupt_pending()` says one is due
    Halt(code)       the guest powered off with an exit code
    Reset()          the guest asked for a reset (the VMM resets the board in place)

A second engine or board (an x86-64 KVM board with vCPU file descriptors) implements
`Machine`; ARCHITECTURE.md says where it plugs in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Union

from pyvirt.backends.block import BlockBackend
from pyvirt.backends.net import NetBackend
from pyvirt.devices.virtio.console import PortBackend


@dataclass(frozen=True)
class BudgetSpent:
    instructions: int


@dataclass(frozen=True)
class Wfi:
    instructions: int = 0


@dataclass(frozen=True)
class Halt:
    code: int
    instructions: int = 0


@dataclass(frozen=True)
class Reset:
    instructions: int = 0


Exit = Union[BudgetSpent, Wfi, Halt, Reset]


@dataclass
class ConsolePorts:
    """virtio-console's host side: port 0 (hvc0, if the spec names it) and the named ports."""

    console_port: PortBackend | None = None
    named_ports: list[tuple[str, PortBackend]] = field(default_factory=list)

    def close(self) -> None:
        if self.console_port is not None:
            self.console_port.close()
        for _, port in self.named_ports:
            port.close()


@dataclass
class HostBackends:
    """The host side of a board's virtio devices, opened by the VMM (`vmm/resources.py`):
    by device kind (machine/virtio_table.py's names), one per device in the spec's order.
    A board owns what it is given and closes it; it opens no file, socket or process itself."""

    by_kind: dict[str, list[Any]] = field(default_factory=dict)

    def of(self, kind: str) -> list[Any]:
        return self.by_kind.setdefault(kind, [])

    @property
    def disks(self) -> list[BlockBackend]:
        return self.of("blk")

    @property
    def nets(self) -> list[NetBackend]:
        return self.of("net")

    @property
    def console(self) -> ConsolePorts:
        ports = self.of("console")
        return ports[0] if ports else ConsolePorts()

    @property
    def console_port(self) -> PortBackend | None:
        return self.console.console_port

    @property
    def named_ports(self) -> list[tuple[str, PortBackend]]:
        return self.console.named_ports

    def close(self) -> None:
        for backends in self.by_kind.values():
            for b in backends:
                b.close()


class Engine(Protocol):
    """What a board asks of the engine that runs its vCPUs."""

    def add_hart(self, hart: Any) -> None: ...

    def run(self, h: Any, budget: int) -> int:
        """Run `h` for about `budget` instructions; returns how many ran."""
        ...


class Clock(Protocol):
    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def seconds_until(self, tick: int) -> float: ...


class Machine(Protocol):
    """What the VMM's run loop, snapshots and host hooks ask of a board."""

    @property
    def clock(self) -> Clock:
        """The VM clock: stopped while the VM is paused or saved."""
        ...

    @property
    def exit_code(self) -> int | None: ...

    @property
    def reset_requested(self) -> bool: ...

    def run_slice(self, budget: int) -> Exit:
        """Give every runnable vCPU a slice of about `budget` instructions."""
        ...

    def interrupt_pending(self) -> bool:
        """Whether a vCPU waiting for an interrupt has one to take (input just arrived)."""
        ...

    def kernel_started(self) -> bool:
        """Whether a vCPU has left the firmware for the kernel (riscv: reached S-mode)."""
        ...

    def poll(self) -> None: ...

    def wait_fds(self) -> list[int]: ...

    def next_deadline(self) -> int | None: ...

    def save_state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any], keep_code: bool = False) -> None: ...

    def close(self) -> None: ...
