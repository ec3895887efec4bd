"""Guest physical memory: RAM in one mmap, plus MMIO dispatch.

RAM is private anonymous memory (in huge pages where the host allows), a snapshot's copy-on-write file mapping (restore), or
a memfd mapped MAP_SHARED (`shared_ram`: a VM with a shared folder, whose
vhost-user back end maps the same pages through the descriptor).

The CPU reads and writes RAM directly through `Bus.ram` (its software TLB maps
guest pages straight to offsets in it).  Everything else -- MMIO, accesses from
devices (DMA), and CPU accesses that miss the TLB -- goes through the bus.

Pages can be *watched*: the CPU watches pages it has translated code from, and
the HTIF `tohost` word of bare-metal programs is watched too.  Writes to a
watched page through the bus (CPU slow path or device DMA) call the watcher,
so translated code is invalidated whatever writes to it.

The dirty-page log (live migration, snapshots): while a log is on,
`dirty_log` is a bytearray with one byte per 4 KiB page of RAM (index =
(physical address - ram_base) >> 12), set to 1 by every writer of guest RAM:
the bus's own write paths (CPU slow path, device DMA through `write`,
`write_bytes`, `dma_written`) mark here; the CPU marks a page when it installs
a writable TLB entry for it, and the log hooks (`add_log_hook`) drop every
writable TLB entry when a log starts and at each harvest, so the next store to
any page goes through a path that marks it.  Native code that refills its own
TLB must either leave write fills to Python or set the log byte itself.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
from collections.abc import Callable, Sequence
from struct import Struct
from typing import Any, Protocol

from pyvirt.errors import ConfigError, GuestMemoryError


class MmioDevice(Protocol):
    """What the bus dispatches to: a device's register window (devices/base.py has the rules)."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...

    def reset(self) -> None: ...

    def save(self) -> dict[str, Any]: ...

    def load(self, state: dict[str, Any]) -> None: ...


PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
RAM_TAIL = 8            # bytes mapped past the end of RAM (see Bus.__init__)
HUGE_PAGE = 2 << 20     # the host's transparent huge page (x86-64, arm64 with 4 KiB pages)

_UNPACK = {1: Struct("<B").unpack_from, 2: Struct("<H").unpack_from,
           4: Struct("<I").unpack_from, 8: Struct("<Q").unpack_from}
_PACK = {1: Struct("<B").pack_into, 2: Struct("<H").pack_into,
         4: Struct("<I").pack_into, 8: Struct("<Q").pack_into}
_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}


class BusError(Exception):
    """No RAM and no device at a physical address (an access fault for the CPU)."""

    def __init__(self, addr: int) -> None:
        super().__init__(f"no memory or device at physical address {addr:#x}")
        self.addr = addr


def anonymous_ram(size: int) -> mmap.mmap:
    """Fresh zeroed memory of at least `size` bytes, private to this process (a page it never touched
    reads as zeros and takes no host memory), in huge pages where the host's transparent huge
    pages allow ("madvise" or "always"): native guest code reaches RAM at random addresses,
    and with 4 KiB pages most of those accesses miss the host's TLB.  (Python's default
    `mmap(-1, n)` is MAP_SHARED shared memory, which takes no huge pages by default.)"""
    # A whole number of huge pages: the kernel then aligns the mapping to one (else RAM's
    # huge pages would straddle the guest's 2 MiB pages, and the first and last stay small).
    m = mmap.mmap(-1, -(-size // HUGE_PAGE) * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
    want_huge_pages(m)
    return m


def want_huge_pages(m: mmap.mmap) -> None:
    """MADV_HUGEPAGE on a private anonymous mapping, where the host has it (else nothing)."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            m.madvise(advice)
        except OSError:                 # (a kernel without transparent huge pages)
            pass


def shared_ram(ram_size: int) -> tuple[mmap.mmap, int]:
    """RAM on a memfd, mapped MAP_SHARED (with Bus's RAM_TAIL): the mapping and the descriptor,
    which a vhost-user back end maps to reach the same pages (`Bus(ram=..., ram_fd=...)`)."""
    fd = os.memfd_create("pyvirt-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, ram_size + PAGE_SIZE)      # (RAM_TAIL rounded up to a page)
        ram = mmap.mmap(fd, ram_size + RAM_TAIL, flags=mmap.MAP_SHARED,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return ram, fd


class Bus:
    """The physical address space of one VM."""

    def __init__(self, ram_base: int, ram_size: int, ram: mmap.mmap | None = None,
                 ram_fd: int | None = None) -> None:
        """`ram`: a mapping to use as RAM instead of fresh zeroed memory (a restored
        snapshot's copy-on-write mapping of its RAM file, or `shared_ram`'s); at least
        RAM_TAIL bytes longer than `ram_size`.  `ram_fd`: the memfd behind a shared `ram`
        (offset 0 is RAM's first byte); the bus owns it and `close()` closes it."""
        if ram_size <= 0 or ram_size % PAGE_SIZE:
            raise ConfigError(f"memory size must be a positive multiple of 4 KiB, not {ram_size}")
        self.ram_base = ram_base
        self.ram_size = ram_size
        self.ram_end = ram_base + ram_size
        # An 8-byte tail lets unaligned fast-path accesses at the very end of RAM
        # stay inside the buffer; the CPU never maps it to the guest.
        if ram is not None and len(ram) < ram_size + RAM_TAIL:
            raise ConfigError(f"RAM mapping of {len(ram)} bytes is too small for {ram_size} bytes of RAM")
        self.ram = anonymous_ram(ram_size + RAM_TAIL) if ram is None else ram
        # Private anonymous memory that only this process writes: a page it never touched
        # reads as zeros (see `touched_pages`).  Not so for a file's copy-on-write mapping
        # or a memfd another process maps; the owner of a `ram` of its own may set it.
        self.ram_private = ram is None
        self._bases: list[int] = []
        self._regions: list[tuple[int, int, MmioDevice, str]] = []
        self.watched: dict[int, list[Callable[[int, int], None]]] = {}
        self.ram_fd = ram_fd
        self.dirty_log: bytearray | None = None
        # One byte per RAM page for the CPU's native page walk (cpu/riscv/native.py):
        # bit 0 the page is watched, bit 1 a native walk made a write entry for it
        # (the CPU's to clear); the byte after the last page is 1 while a dirty log runs.
        self.page_flags = bytearray((ram_size >> PAGE_SHIFT) + 1)
        self.page_flags_address = ctypes.addressof(ctypes.c_char.from_buffer(self.page_flags))
        self._log_hooks: list[Callable[[], None]] = []
        self._pagemap: int | None = None
        self._ram_host = 0

    def close(self) -> None:
        """Close the RAM's memfd, if any (the mapping lives on until it is dropped)."""
        if self.ram_fd is not None:
            os.close(self.ram_fd)
            self.ram_fd = None
        if self._pagemap is not None:
            os.close(self._pagemap)
            self._pagemap = None

    def touched_pages(self, first: int, count: int) -> list[int] | None:
        """Of RAM pages first .. first+count-1 (indexes), those that may hold data: the ones
        this process's page table has (present or swapped out, /proc/self/pagemap), when
        RAM is `ram_private`; the others were never touched and read as zeros.  None when
        that cannot be known (every page may hold data)."""
        if not self.ram_private or first < 0 or count <= 0 or (first + count) << PAGE_SHIFT > self.ram_size:
            return None
        try:
            if self._pagemap is None:
                self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
                self._ram_host = ctypes.addressof(ctypes.c_char.from_buffer(self.ram))
            raw = os.pread(self._pagemap, 8 * count, ((self._ram_host >> PAGE_SHIFT) + first) * 8)
        except (OSError, ValueError, TypeError):
            return None
        if len(raw) != 8 * count:
            return None
        entries = memoryview(raw).cast("Q")
        return [first + i for i in range(count) if entries[i] >> 62]       # (bit 63 present, 62 swapped)

    # -- layout ---------------------------------------------------------------
    def add_mmio(self, base: int, size: int, device: MmioDevice, name: str = "") -> None:
        end = base + size
        if base < self.ram_end and end > self.ram_base:
            raise ConfigError(f"MMIO region {name} {base:#x}+{size:#x} overlaps RAM")
        for b, s, _, n in self._regions:
            if base < b + s and end > b:
                raise ConfigError(f"MMIO region {name} {base:#x}+{size:#x} overlaps {n}")
        i = bisect.bisect(self._bases, base)
        self._bases.insert(i, base)
        self._regions.insert(i, (base, size, device, name))

    def regions(self) -> list[tuple[int, int, MmioDevice, str]]:
        return list(self._regions)

    def find_mmio(self, addr: int) -> tuple[MmioDevice, int] | None:
        i = bisect.bisect(self._bases, addr) - 1
        if i >= 0:
            base, size, dev, _ = self._regions[i]
            if addr < base + size:
                return dev, addr - base
        return None

    def is_ram(self, addr: int, length: int = 1) -> bool:
        return self.ram_base <= addr and addr + length <= self.ram_end and length >= 0

    # -- watched pages ----------------------------------------------------------
    def watch(self, page: int, callback: Callable[[int, int], None]) -> None:
        """Call `callback(addr, length)` when page number `page` is written via the bus."""
        self.watched.setdefault(page, []).append(callback)
        index = page - (self.ram_base >> PAGE_SHIFT)
        if 0 <= index < len(self.page_flags) - 1:
            self.page_flags[index] |= 1

    def unwatch(self, page: int, callback: Callable[[int, int], None]) -> None:
        cbs = self.watched.get(page)
        if cbs is not None and callback in cbs:
            cbs.remove(callback)
            if not cbs:
                del self.watched[page]
                index = page - (self.ram_base >> PAGE_SHIFT)
                if 0 <= index < len(self.page_flags) - 1:
                    self.page_flags[index] &= ~1

    def _notify(self, addr: int, length: int) -> None:
        first = addr >> PAGE_SHIFT
        last = (addr + length - 1) >> PAGE_SHIFT
        watched = self.watched
        for page in range(first, last + 1):
            cbs = watched.get(page)
            if cbs is not None:
                for cb in list(cbs):
                    cb(addr, length)

    # -- dirty-page log ---------------------------------------------------------
    def add_log_hook(self, hook: Callable[[], None]) -> None:
        """Call `hook()` when a dirty log starts and at each harvest: the CPU's
        engine drops its harts' writable TLB entries there."""
        self._log_hooks.append(hook)

    def remove_log_hook(self, hook: Callable[[], None]) -> None:
        if hook in self._log_hooks:
            self._log_hooks.remove(hook)

    def start_dirty_log(self) -> None:
        """Start logging written RAM pages (a running log is cleared)."""
        self.dirty_log = bytearray(self.ram_size >> PAGE_SHIFT)
        self.page_flags[-1] = 1                 # before the hooks drop the write entries
        for hook in list(self._log_hooks):
            hook()

    def harvest_dirty(self) -> set[int]:
        """The RAM page indexes ((addr - ram_base) >> 12) written since the log
        started or was last harvested; the log is cleared (in place) and the
        writable TLB entries dropped again."""
        log = self.dirty_log
        if log is None:
            raise ConfigError("no dirty-page log is running")
        for hook in list(self._log_hooks):
            hook()
        pages: set[int] = set()
        find = log.find
        i = find(1)
        while i >= 0:
            pages.add(i)
            i = find(1, i + 1)
        log[:] = bytes(len(log))
        return pages

    def stop_dirty_log(self) -> None:
        self.dirty_log = None
        self.page_flags[-1] = 0

    def clear_native_write(self, page: int) -> None:
        """Every hart has dropped its native write entries for page number `page`."""
        index = page - (self.ram_base >> PAGE_SHIFT)
        if 0 <= index < len(self.page_flags) - 1:
            self.page_flags[index] &= ~2

    def mark_dirty(self, addr: int, length: int) -> None:
        """Mark the RAM pages of guest range `addr`+`length` written (the part in RAM)."""
        log = self.dirty_log
        if log is not None and length > 0:
            first = max(addr - self.ram_base, 0) >> PAGE_SHIFT
            last = min((addr - self.ram_base + length - 1) >> PAGE_SHIFT, len(log) - 1)
            if first > last:
                return
            if first == last:
                log[first] = 1
            else:
                log[first:last + 1] = b"\x01" * (last + 1 - first)

    # -- word access (CPU slow path, devices' register-sized DMA) ---------------
    def read(self, addr: int, size: int) -> int:
        off = addr - self.ram_base
        if 0 <= off and addr + size <= self.ram_end:
            return _UNPACK[size](self.ram, off)[0]
        hit = self.find_mmio(addr)
        if hit is None:
            raise BusError(addr)
        dev, offset = hit
        return dev.read(offset, size) & _MASK[size]

    def write(self, addr: int, size: int, value: int) -> None:
        off = addr - self.ram_base
        if 0 <= off and addr + size <= self.ram_end:
            _PACK[size](self.ram, off, value & _MASK[size])
            log = self.dirty_log
            if log is not None:
                log[off >> PAGE_SHIFT] = 1
                log[(off + size - 1) >> PAGE_SHIFT] = 1
            if self.watched:
                self._notify(addr, size)
            return
        hit = self.find_mmio(addr)
        if hit is None:
            raise BusError(addr)
        dev, offset = hit
        dev.write(offset, size, value & _MASK[size])

    # -- DMA ---------------------------------------------------------------------
    def _ram_offset(self, addr: int, length: int) -> int:
        if length < 0 or not (self.ram_base <= addr and addr + length <= self.ram_end):
            raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} is outside RAM")
        return addr - self.ram_base

    def view(self, addr: int, length: int) -> memoryview:
        """A zero-copy view of guest RAM.  Call `dma_written` after writing through it."""
        off = self._ram_offset(addr, length)
        return memoryview(self.ram)[off:off + length]

    def read_bytes(self, addr: int, length: int) -> bytes:
        off = self._ram_offset(addr, length)
        return self.ram[off:off + length]

    def write_bytes(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        off = self._ram_offset(addr, length)
        memoryview(self.ram)[off:off + length] = data     # (PyPy's mmap takes only bytes)
        self.mark_dirty(addr, length)
        if self.watched and length:
            self._notify(addr, length)

    def dma_written(self, addr: int, length: int) -> None:
        """Tell the bus that `length` bytes at `addr` were written through a view (or by an
        external back end): translated code from those pages is dropped, the log marks them."""
        if self.dirty_log is not None:
            self.mark_dirty(addr, length)
        if self.watched and length > 0:
            self._notify(addr, length)

    def dma_written_spans(self, spans: Sequence[tuple[int, int]]) -> None:
        """`dma_written` for each (addr, length) of a device's scatter list, in one pass."""
        if self.dirty_log is not None:
            for addr, length in spans:
                self.mark_dirty(addr, length)
        watched = self.watched
        if not watched:
            return
        for addr, length in spans:
            if length > 0:
                page = addr >> PAGE_SHIFT
                if page in watched or (addr + length - 1) >> PAGE_SHIFT != page:
                    self._notify(addr, length)

    # -- state ---------------------------------------------------------------------
    def save_devices(self) -> dict[str, Any]:
        return {name: dev.save() for _, _, dev, name in self._regions}
