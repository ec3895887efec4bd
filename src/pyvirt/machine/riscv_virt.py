"""The "virt" board: memory map, devices, device tree and boot.

The layout follows QEMU's riscv64 virt machine, so guests (and OpenSBI)
built for it run unchanged::

    0x0010_0000  test finisher / syscon (power-off, reboot, exit status)
    0x0010_1000  goldfish RTC                       PLIC irq 11
    0x0200_0000  CLINT (msip, mtimecmp, mtime)
    0x0c00_0000  PLIC
    0x1000_0000  NS16550A UART                      PLIC irq 10
    0x1000_1000  virtio-mmio slots, 0x1000 apart    PLIC irqs 1..8
    0x8000_0000  RAM
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from typing import Any

from pyvirt.backends.char import CharBackend
from pyvirt.clock import Clock
from pyvirt.compat import zip_strict
from pyvirt.cpu.riscv import codecache
from pyvirt.cpu.riscv.csr import MEIP, MSIP, MTIP, S_INTERRUPTS, SEIP, STCE, STIP
from pyvirt.cpu.riscv.engine import Engine
from pyvirt.cpu.riscv.hart import HART_STARTED, HART_STOPPED, Hart
from pyvirt.devices.aclint import Aclint
from pyvirt.devices.base import IrqLine
from pyvirt.devices.goldfish_rtc import GoldfishRtc
from pyvirt.devices.plic import Plic
from pyvirt.devices.syscon import Syscon
from pyvirt.devices.uart16550 import Uart16550
from pyvirt.devices.virtio.console import VirtioConsole
from pyvirt.devices.virtio.device import VirtioDevice
from pyvirt.devices.virtio.fs import VirtioFs
from pyvirt.devices.virtio.mmio import VirtioMmio
from pyvirt.devices.virtio.net import VirtioNet
from pyvirt.errors import ConfigError
from pyvirt.fsutil import cache_root
from pyvirt.machine import boot
from pyvirt.machine.fdt import U64, Node, reg, to_dtb
from pyvirt.machine.interface import BudgetSpent, Exit, Halt, HostBackends, Reset, Wfi
from pyvirt.machine.sbi import Sbi
from pyvirt.machine.virtio_table import VIRTIO_KINDS
from pyvirt.memory import Bus, shared_ram
from pyvirt.spec import VmSpec

RAM_BASE = 0x8000_0000
TEST_BASE, RTC_BASE = 0x10_0000, 0x10_1000
CLINT_BASE, CLINT_SIZE = 0x200_0000, 0x1_0000
PLIC_BASE = 0xC00_0000
UART_BASE, UART_IRQ = 0x1000_0000, 10
RTC_IRQ = 11
VIRTIO_BASE, VIRTIO_SLOTS = 0x1000_1000, 8
UART_CLOCK = 3_686_400
ISA = "rv64imafdc_zicsr_zifencei_zihintpause_sstc"
# Every exception but ecalls from S and M goes straight to the kernel.
SBI_MEDELEG = 0xB1FF
M64 = (1 << 64) - 1


class VirtBoard:
    """One riscv64 virt computer, assembled from a VmSpec; not yet running."""

    def __init__(self, spec: VmSpec, console: CharBackend,
                 on_power: Callable[[str, int], None] | None = None, *,
                 ram: mmap.mmap | None = None, ram_fd: int | None = None, restore: bool = False,
                 host: HostBackends | None = None) -> None:
        """`restore=True` builds the machine without booting it (no kernel load, no device
        tree): the caller loads a snapshot's state with `load_state()`.  `ram` is the memory
        to use as RAM (see `Bus`), `ram_fd` the memfd behind it when it is shared memory (a
        restored VM with a shared folder: `vmm.snapshot.map_ram`).  `host`: the opened host side of the spec's disks, NICs
        and console ports (the VMM's `vmm.resources.open_backends`); the board owns it from
        here on, even when this constructor fails."""
        self.host = host if host is not None else HostBackends()
        if spec.kernel is None and spec.bios is None and not restore:
            self.host.close()
            raise ConfigError("nothing to boot: give --kernel or --bios")
        self.spec = spec
        self.console = console
        self.on_power = on_power
        self.exit_code: int | None = None
        self.reset_requested = False
        self.clock = Clock()
        if spec.shares:                 # a vhost-user back end maps guest RAM: a memfd
            if ram is None:
                ram, ram_fd = shared_ram(spec.memory)
            elif ram_fd is None:
                self.host.close()
                raise ConfigError("a VM with a shared folder needs its RAM on a memfd (shared with virtiofsd)")
        self.bus = Bus(RAM_BASE, spec.memory, ram, ram_fd)
        self.engine = Engine(self.bus, spec.engine,
                             code_cache=codecache.for_board(cache_root(), spec.kernel) if spec.engine == "native" else None)
        self.harts = [Hart(i, self.bus, self.clock, native_regs=spec.engine == "native")
                      for i in range(spec.cpus)]
        for h in self.harts:
            self.engine.add_hart(h)
            h.yield_on_pause = spec.cpus > 1
        self.backends = self.host.disks           # (a snapshot swaps in the live overlays here)
        self.dtb_addr = 0
        self.tohost: int | None = None
        try:
            self._build_devices()
            if restore:
                if spec.bios is None:
                    self._attach_sbi()
            else:
                self._boot()
        except BaseException:
            self.close()                 # no passt process or socket left behind
            raise

    @staticmethod
    def check_devices(spec: VmSpec) -> None:
        """Refuse a spec with more virtio devices than the board has slots (before the VMM
        opens anything for them)."""
        count = sum(kind.count(spec) for kind in VIRTIO_KINDS)
        if count > VIRTIO_SLOTS:
            raise ConfigError(f"too many virtio devices (the board has {VIRTIO_SLOTS} slots)")

    # -- running (the Machine interface, machine/interface.py) -----------------------
    def run_slice(self, budget: int) -> Exit:
        """One round: each started hart that is not waiting for an interrupt (or has one
        pending) takes its pending interrupt and runs about `budget` instructions."""
        engine, harts = self.engine, self.harts
        ran = 0
        for h in harts:
            if h.state != HART_STARTED:
                continue
            if h.idle:
                if not h.mip & h.mie:
                    continue
                h.idle = False
            h.take_pending_interrupt()
            ran += engine.run(h, budget)
        if len(harts) > 1:
            for h in harts:            # another hart may have written a reserved address
                h.resv = -1
        if self.exit_code is not None:
            return Halt(self.exit_code, ran)
        if self.reset_requested:
            return Reset(ran)
        return BudgetSpent(ran) if ran else Wfi()

    def interrupt_pending(self) -> bool:
        return any(h.state == HART_STARTED and h.idle and h.mip & h.mie for h in self.harts)

    def kernel_started(self) -> bool:
        return any(h.priv == 1 for h in self.harts)

    # -- devices -------------------------------------------------------------------
    @staticmethod
    def _mip_line(h: Hart, bit: int) -> Callable[[bool], None]:
        return lambda level: h.set_irq(bit, level)

    def _build_devices(self) -> None:
        bus, harts = self.bus, self.harts
        outputs = []
        for h in harts:
            outputs += [self._mip_line(h, MEIP), self._mip_line(h, SEIP)]
        self.plic = Plic(len(harts), outputs)
        bus.add_mmio(PLIC_BASE, Plic.SIZE, self.plic, "plic")
        self.clint = Aclint(len(harts), self.clock,
                            [IrqLine(self._mip_line(h, MSIP)) for h in harts],
                            [IrqLine(self._mip_line(h, MTIP)) for h in harts])
        bus.add_mmio(CLINT_BASE, CLINT_SIZE, self.clint, "clint")
        self.uart = Uart16550(self.plic.irq_line(UART_IRQ), self.console)
        bus.add_mmio(UART_BASE, 0x100, self.uart, "uart0")
        self.rtc = GoldfishRtc(self.plic.irq_line(RTC_IRQ), clock=self.clock)
        bus.add_mmio(RTC_BASE, 0x1000, self.rtc, "rtc")
        self.syscon = Syscon(self._power_event)
        bus.add_mmio(TEST_BASE, 0x1000, self.syscon, "test")
        self.virtio: list[tuple[int, int, VirtioMmio]] = []
        for kind in VIRTIO_KINDS:               # (machine/virtio_table.py: slot order)
            backends = self.host.of(kind.name)
            for i in range(kind.count(self.spec)):
                self._add_virtio(kind.make(self.clock, self.spec, i, backends[i] if i < len(backends) else None))
        devices = [t.device for _, _, t in self.virtio]
        self.host_io: list[VirtioDevice] = [d for d in devices if d.serves_host]   # polled between slices
        self.vconsole = next((d for d in devices if isinstance(d, VirtioConsole)), None)
        self.nics = [d for d in devices if isinstance(d, VirtioNet)]

    def _add_virtio(self, device: Any) -> None:
        slot = len(self.virtio)
        if slot >= VIRTIO_SLOTS:
            raise ConfigError(f"too many virtio devices (the board has {VIRTIO_SLOTS} slots)")
        base, irq = VIRTIO_BASE + slot * 0x1000, 1 + slot
        transport = VirtioMmio(device, self.bus, self.plic.irq_line(irq))
        self.bus.add_mmio(base, 0x1000, transport, f"virtio{slot}")
        self.virtio.append((base, irq, transport))

    def reset(self) -> None:
        """System reset (a guest reboot): every device and hart back to its power-on state,
        translations dropped, and the guest loaded again as at first boot.  The host
        backends (disk images, passt, console and port sockets), the clock and RAM stay --
        RAM is not cleared, as on real hardware; the loader writes what it places."""
        self.exit_code = None
        self.reset_requested = False
        if self.tohost is not None:
            self.bus.unwatch(self.tohost >> 12, self._htif_write)
            self.tohost = None
        for _, _, dev, _ in self.bus.regions():
            dev.reset()
        self.engine.flush()
        for h in self.harts:
            h.reset()
        self._boot()

    def _power_event(self, kind: str, code: int) -> None:
        if kind == "reset":
            self.reset_requested = True
        else:
            self.exit_code = code
        if self.on_power:
            self.on_power(kind, code)

    def system_reset(self, reset_type: int, reason: int) -> None:
        """SBI SRST: shutdown (0) or reboot (1, 2); reason 1 is a system failure."""
        self.reset_reason = reason
        if reset_type == 0:
            self._power_event("poweroff", 1 if reason == 1 else 0)
        else:
            self._power_event("reset", 0)

    # -- SBI platform hooks ----------------------------------------------------------
    def console_write(self, data: bytes) -> None:
        self.console.write(data)

    def console_read(self) -> int:
        return self.uart.take_host_byte() if hasattr(self.uart, "take_host_byte") else -1

    def guest_read(self, addr: int, length: int) -> bytes | None:
        if length < 0 or length > 1 << 20 or not self.bus.is_ram(addr, length):
            return None
        return self.bus.read_bytes(addr, length)

    # -- device tree ---------------------------------------------------------------------
    def device_tree(self, bootargs: str, initrd: tuple[int, int] | None) -> Node:
        harts = self.harts
        phandles = iter(range(1, 1000))
        intc = [next(phandles) for _ in harts]
        plic_ph, test_ph = next(phandles), next(phandles)
        root = Node("", {"#address-cells": 2, "#size-cells": 2, "compatible": "riscv-virtio",
                         "model": "pyvirt,virt"})
        chosen = root.add(Node("chosen", {"bootargs": bootargs,
                                          "stdout-path": f"/soc/serial@{UART_BASE:x}",
                                          "rng-seed": os.urandom(64)}))
        if initrd:
            chosen.props["linux,initrd-start"] = U64(initrd[0])
            chosen.props["linux,initrd-end"] = U64(initrd[1])
        root.add(Node(f"memory@{RAM_BASE:x}", {"device_type": "memory",
                                              "reg": reg((RAM_BASE, self.bus.ram_size))}))
        cpus = root.add(Node("cpus", {"#address-cells": 1, "#size-cells": 0,
                                      "timebase-frequency": self.clock.hz}))
        cluster = Node("cluster0")
        for h, ph in zip_strict(harts, intc):
            cpu = cpus.add(Node(f"cpu@{h.hartid}", {
                "device_type": "cpu", "reg": h.hartid, "status": "okay", "compatible": "riscv",
                "riscv,isa": ISA, "mmu-type": f"riscv,{self.spec.mmu}",
                "phandle": 100 + h.hartid}))
            cpu.add(Node("interrupt-controller", {
                "#interrupt-cells": 1, "interrupt-controller": None,
                "compatible": "riscv,cpu-intc", "phandle": ph}))
            cluster.add(Node(f"core{h.hartid}", {"cpu": 100 + h.hartid}))
        cpus.add(Node("cpu-map", children=[cluster]))
        soc = root.add(Node("soc", {"#address-cells": 2, "#size-cells": 2,
                                    "compatible": "simple-bus", "ranges": None}))
        soc.add(Node(f"clint@{CLINT_BASE:x}", {
            "compatible": ["sifive,clint0", "riscv,clint0"], "reg": reg((CLINT_BASE, CLINT_SIZE)),
            "interrupts-extended": [v for ph in intc for v in (ph, 3, ph, 7)]}))
        soc.add(Node(f"plic@{PLIC_BASE:x}", {
            "compatible": ["sifive,plic-1.0.0", "riscv,plic0"], "reg": reg((PLIC_BASE, Plic.SIZE)),
            "#address-cells": 0, "#interrupt-cells": 1, "interrupt-controller": None,
            "riscv,ndev": 95, "phandle": plic_ph,
            "interrupts-extended": [v for ph in intc for v in (ph, 11, ph, 9)]}))
        soc.add(Node(f"serial@{UART_BASE:x}", {
            "compatible": "ns16550a", "reg": reg((UART_BASE, 0x100)), "clock-frequency": UART_CLOCK,
            "interrupt-parent": plic_ph, "interrupts": UART_IRQ}))
        soc.add(Node(f"rtc@{RTC_BASE:x}", {
            "compatible": "google,goldfish-rtc", "reg": reg((RTC_BASE, 0x1000)),
            "interrupt-parent": plic_ph, "interrupts": RTC_IRQ}))
        soc.add(Node(f"test@{TEST_BASE:x}", {
            "compatible": ["sifive,test1", "sifive,test0", "syscon"], "reg": reg((TEST_BASE, 0x1000)),
            "phandle": test_ph}))
        for base, irq, _ in self.virtio:
            soc.add(Node(f"virtio_mmio@{base:x}", {
                "compatible": "virtio,mmio", "reg": reg((base, 0x1000)),
                "interrupt-parent": plic_ph, "interrupts": irq}))
        root.add(Node("poweroff", {"compatible": "syscon-poweroff", "regmap": test_ph,
                                   "offset": 0, "value": 0x5555}))
        root.add(Node("reboot", {"compatible": "syscon-reboot", "regmap": test_ph,
                                 "offset": 0, "value": 0x7777}))
        return root

    # -- boot ----------------------------------------------------------------------------
    def _boot(self) -> None:
        spec, bus = self.spec, self.bus
        floor = bus.ram_base
        entry = 0
        if spec.kernel is not None:
            kernel = boot.load_kernel(bus, spec.kernel)
            floor, entry = kernel.end, kernel.entry
        firmware = None
        if spec.bios is not None:
            firmware, symbols = boot.load_firmware(bus, spec.bios)
            floor = max(floor, firmware.end)
            self.tohost = symbols.get("tohost")
        # Device tree and initrd go at the top of RAM, the device tree highest.
        initrd_data = boot.read_file(spec.initrd, "initrd", bus.ram_size) if spec.initrd else None
        bootargs = spec.append if spec.append is not None else "console=ttyS0"
        fdt_size_guess = 64 << 10
        initrd_range = None
        if initrd_data is not None:
            top = bus.ram_end - fdt_size_guess
            start = boot.place_top(bus, initrd_data, top, floor, 4096, f"initrd {spec.initrd}")
            initrd_range = (start, start + len(initrd_data))
        dtb = to_dtb(self.device_tree(bootargs, initrd_range))
        if len(dtb) > fdt_size_guess:
            raise ConfigError("device tree too large")
        self.dtb_addr = (bus.ram_end - len(dtb)) & ~0xFFF
        bus.write_bytes(self.dtb_addr, dtb)
        self.dtb = dtb

        if firmware is not None:
            info = self._fw_dynamic_info(entry) if spec.kernel is not None else 0
            for h in self.harts:        # M-mode firmware: every hart starts at its entry
                h.pc = firmware.entry
                h.x[10], h.x[11], h.x[12] = h.hartid, self.dtb_addr, info
            if self.tohost is not None:
                bus.watch(self.tohost >> 12, self._htif_write)
            return
        self._attach_sbi()
        for h in self.harts:
            h.medeleg = SBI_MEDELEG
            h.mideleg = S_INTERRUPTS
            # As OpenSBI does: let S- and U-mode read cycle, time and instret.
            h.mcounteren = h.scounteren = 7
            h.menvcfg = STCE            # Sstc: the kernel programs stimecmp itself
            h.set_priv(1)
            h.state = HART_STOPPED
        boot_hart = self.harts[0]
        boot_hart.state = HART_STARTED
        boot_hart.pc = entry
        boot_hart.x[10], boot_hart.x[11] = 0, self.dtb_addr

    def _fw_dynamic_info(self, kernel_entry: int) -> int:
        """OpenSBI's fw_dynamic protocol (as QEMU's reset vector passes it in a2): a struct
        fw_dynamic_info {magic "OSBI", version 2, next_addr, next_mode S, options, boot_hart
        -1 (any)} below the device tree, telling the firmware where the kernel is."""
        import struct
        data = struct.pack("<6Q", 0x4942534F, 2, kernel_entry, 1, 0, (1 << 64) - 1)
        addr = self.dtb_addr - 64
        if not self.bus.is_ram(addr, len(data)):
            raise ConfigError("no room in guest RAM for the firmware's boot information")
        self.bus.write_bytes(addr, data)
        return addr

    def _attach_sbi(self) -> None:
        """No firmware: the VMM serves every hart's S-mode ecalls."""
        sbi = Sbi(self)
        for h in self.harts:
            h.ecall_hook = sbi

    # -- snapshots ---------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        """The whole machine's state as plain data (between CPU slices).  RAM and disks are
        not in it: vmm/snapshot.py writes those."""
        return {"clock": self.clock.save(), "harts": [h.save() for h in self.harts],
                "devices": self.bus.save_devices(), "tohost": self.tohost, "dtb_addr": self.dtb_addr}

    def load_state(self, state: dict[str, Any], keep_code: bool = False) -> None:
        """Load what `save_state` returned (already checked by the snapshot code: a state
        from an untrusted file must go through `vmm.snapshot`'s validation first).
        Translations and TLBs are caches, not state: the TLBs are dropped, and the
        translations too unless `keep_code` -- for a board whose RAM reached it only
        through writes that drop the translations of the pages written (`Bus.dma_written`:
        a migration's destination, which translated the guest's blocks ahead)."""
        self.clock.load(state["clock"])
        for h, hs in zip_strict(self.harts, state["harts"]):
            h.load(hs)
        devices = state["devices"]
        for _, _, dev, name in self.bus.regions():
            dev.load(devices[name])
        self.dtb_addr = state["dtb_addr"]
        self.tohost = state["tohost"]
        if self.tohost is not None and self.spec.bios is not None:
            self.bus.watch(self.tohost >> 12, self._htif_write)
        if not keep_code:
            self.engine.flush()
        for h in self.harts:
            h.flush_tlb(all_modes=True)

    def _htif_write(self, addr: int, length: int) -> None:
        """HTIF (Spike's host-target interface) as riscv-tests and Spike use it."""
        assert self.tohost is not None
        if not (addr < self.tohost + 8 and self.tohost < addr + length):
            return
        value = self.bus.read(self.tohost, 8)
        if value == 0:
            return
        device, cmd, payload = value >> 56, (value >> 48) & 0xFF, value & ((1 << 48) - 1)
        if device == 0 and cmd == 0 and payload & 1:
            self._power_event("poweroff", payload >> 1)
        elif device == 1 and cmd == 1:
            self.console.write(bytes([payload & 0xFF]))
            self.bus.ram[self.tohost - RAM_BASE:self.tohost - RAM_BASE + 8] = bytes(8)
            fromhost = self.tohost + 64
            if self.bus.is_ram(fromhost, 8):
                self.bus.write(fromhost, 8, (1 << 56) | (1 << 48))

    # -- time ----------------------------------------------------------------------------
    def poll(self) -> None:
        """Bring interrupt lines up to date with the clock (between CPU slices)."""
        now = self.clock.ticks()
        for h in self.harts:
            if h.stimecmp <= now and (h.ecall_hook is not None or h.menvcfg & STCE):
                h.set_irq(STIP, True)
        self.clint.poll()
        self.rtc.poll()
        for dev in self.host_io:
            dev.poll()

    def wait_fds(self) -> list[int]:
        """Host descriptors whose input should wake an idle VM."""
        return [fd for dev in self.host_io for fd in dev.wait_fds()]

    def next_deadline(self) -> int | None:
        """The clock tick at which the next timer fires, if any."""
        cands = [h.stimecmp for h in self.harts
                 if (h.ecall_hook is not None or h.menvcfg & STCE) and h.stimecmp < M64]
        for d in (self.clint.next_deadline(), self.rtc.next_deadline(), *(x.next_deadline() for x in self.host_io)):
            if d is not None:
                cands.append(d)
        return min(cands) if cands else None

    def close(self) -> None:
        for dev in self.host_io:
            if isinstance(dev, VirtioFs):       # its eventfds (the back end is the host side's)
                dev.close()
        try:
            self.engine.close()              # keeps this run's native code (codecache.py)
        finally:
            try:
                self.host.close()
            finally:
                self.bus.close()
