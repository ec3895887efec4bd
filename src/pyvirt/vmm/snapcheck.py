"""Checking a snapshot's machine state before any of it is loaded.

A snapshot file is untrusted input, like the guest.  Every value of the state
goes through a schema built from the machine it is loaded into: types, exact
key sets, list lengths (the number of harts, queues, ports), integer ranges
(nothing that sizes an allocation or indexes a table is unbounded) and the
WARL rules the CPU relies on (no reserved privilege, MPP or satp mode).  The
result is the state with bytes decoded (the state file stores them as
base64), ready for the components' `load()`.  A mismatch is one ConfigError
naming the path of the bad value, e.g. ``harts[0].priv``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable
from typing import Any

from pyvirt.cpu.riscv.csr import MPP, MPP_SHIFT
from pyvirt.devices.aclint import Aclint
from pyvirt.devices.goldfish_rtc import GoldfishRtc
from pyvirt.devices.plic import MAX_PRIORITY, NUM_SOURCES, SOURCE_MASK, Plic
from pyvirt.devices.syscon import Syscon
from pyvirt.devices.uart16550 import FIFO_SIZE, HOST_QUEUE_LIMIT, Uart16550
from pyvirt.devices.virtio import console as vconsole
from pyvirt.devices.virtio import net as vnet
from pyvirt.devices.virtio.blk import VIRTIO_BLK_ID_BYTES, VirtioBlk
from pyvirt.devices.virtio.console import VirtioConsole
from pyvirt.devices.virtio.device import VirtioDevice
from pyvirt.devices.virtio.mmio import VirtioMmio
from pyvirt.devices.virtio.net import VirtioNet
from pyvirt.devices.virtio.queue import SplitQueue
from pyvirt.errors import ConfigError

M64 = (1 << 64) - 1
M32 = 0xFFFF_FFFF
MAX_TEXT = 4096


class StateError(ConfigError):
    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"snapshot state {where or '(top)'}: {why}")


Schema = Callable[[Any, str], Any]


def integer(lo: int, hi: int, rule: Callable[[int], str | None] | None = None) -> Schema:
    """An int in lo..hi (inclusive); `rule(v)` may name a further violation."""
    def check(v: Any, where: str) -> int:
        if type(v) is not int:
            raise StateError(where, f"expected an integer, not {type(v).__name__}")
        if not lo <= v <= hi:
            raise StateError(where, f"{v} is outside {lo}..{hi}")
        why = rule(v) if rule is not None else None
        if why:
            raise StateError(where, why)
        return v
    return check


def one_of(*values: int) -> Schema:
    allowed = set(values)
    return integer(min(values), max(values),
                   lambda v: None if v in allowed else f"{v} is not one of {sorted(allowed)}")


U8, U16, U32, U64 = integer(0, 0xFF), integer(0, 0xFFFF), integer(0, M32), integer(0, M64)


def boolean(v: Any, where: str) -> bool:
    if type(v) is not bool:
        raise StateError(where, f"expected true or false, not {type(v).__name__}")
    return v


def text(limit: int = MAX_TEXT) -> Schema:
    def check(v: Any, where: str) -> str:
        if type(v) is not str:
            raise StateError(where, f"expected a string, not {type(v).__name__}")
        if len(v) > limit:
            raise StateError(where, f"string longer than {limit}")
        return v
    return check


def blob(limit: int) -> Schema:
    """Bytes, stored as base64 text; at most `limit` of them."""
    def check(v: Any, where: str) -> bytes:
        if type(v) is not str or len(v) > 4 * (limit // 3 + 1):
            raise StateError(where, f"expected base64 text of at most {limit} bytes")
        try:
            data = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise StateError(where, "invalid base64") from None
        if len(data) > limit:
            raise StateError(where, f"{len(data)} bytes, more than {limit}")
        return data
    return check


def listof(item: Schema, lo: int, hi: int | None = None) -> Schema:
    """A list of `lo`..`hi` items (exactly `lo` when hi is None)."""
    top = lo if hi is None else hi

    def check(v: Any, where: str) -> list[Any]:
        if type(v) is not list:
            raise StateError(where, f"expected a list, not {type(v).__name__}")
        if not lo <= len(v) <= top:
            want = str(lo) if lo == top else f"{lo}..{top}"
            raise StateError(where, f"{len(v)} items where the machine has {want}")
        return [item(x, f"{where}[{i}]") for i, x in enumerate(v)]
    return check


def record(fields: dict[str, Schema], optional: Iterable[str] = ()) -> Schema:
    """A dict with exactly these keys (those in `optional` may be missing)."""
    opt = set(optional)

    def check(v: Any, where: str) -> dict[str, Any]:
        if type(v) is not dict:
            raise StateError(where, f"expected an object, not {type(v).__name__}")
        extra = set(v) - set(fields)
        if extra:
            raise StateError(where, f"unknown entries {sorted(map(str, extra))[:5]}")
        missing = set(fields) - set(v) - opt
        if missing:
            raise StateError(where, f"missing entries {sorted(missing)[:5]}")
        return {k: s(v[k], f"{where}.{k}" if where else k) for k, s in fields.items() if k in v}
    return check


def optional(inner: Schema) -> Schema:
    def check(v: Any, where: str) -> Any:
        return None if v is None else inner(v, where)
    return check


# -- the machine's parts ------------------------------------------------------------------
def _mstatus_rule(v: int) -> str | None:
    return "MPP is the reserved value 2" if (v & MPP) >> MPP_SHIFT == 2 else None


def _satp_rule(v: int) -> str | None:
    return None if v >> 60 in (0, 8, 9) else f"unsupported satp mode {v >> 60}"


def _tvec_rule(v: int) -> str | None:
    return "reserved trap-vector mode" if v & 2 else None


def hart_schema(ram_size: int) -> Schema:
    fields: dict[str, Schema] = {k: U64 for k in (
        "pc", "medeleg", "mideleg", "mie", "mip", "mscratch", "sscratch", "mepc", "sepc",
        "mcause", "scause", "mtval", "stval", "mcounteren", "scounteren", "mcountinhibit",
        "menvcfg", "senvcfg", "instret", "stimecmp")}
    fields.update(
        priv=one_of(0, 1, 3), fflags=integer(0, 0x1F), frm=integer(0, 7),
        mstatus=integer(0, M64, _mstatus_rule), satp=integer(0, M64, _satp_rule),
        mtvec=integer(0, M64, _tvec_rule), stvec=integer(0, M64, _tvec_rule),
        idle=boolean, state=one_of(0, 1, 2),
        x=listof(U64, 32), f=listof(U64, 32), pmp=listof(U64, 80),
        resv=integer(-1, ram_size - 1))
    return record(fields)


def queue_schema(q: SplitQueue) -> Schema:
    return record({"size": integer(0, q.max_size), "ready": boolean, "desc": U64, "avail": U64,
                   "used": U64, "last_avail": U16, "used_idx": U16, "signalled_used": U16,
                   "event_idx": boolean, "broken": text()})


def _device_specific(dev: VirtioDevice) -> Schema:
    if isinstance(dev, VirtioBlk):
        backend = record({"path": text(), "size": U64, "read_only": boolean,
                          "format": text(16)}, optional=("format",))
        return record({"backend": backend, "serial": blob(VIRTIO_BLK_ID_BYTES)})
    if isinstance(dev, VirtioNet):
        return record({"pending": listof(blob(vnet.MAX_FRAME + vnet.HDR_SIZE), 0,
                                         vnet.MAX_PENDING_FRAMES),
                       "link_up": boolean})
    if isinstance(dev, VirtioConsole):
        n = len(dev.backends)
        return record({"ready": listof(boolean, n), "told_open": listof(boolean, n),
                       "guest_open": listof(boolean, n), "host_gone": listof(boolean, n),
                       "pending_in": listof(blob(vconsole.MAX_PENDING), n),
                       "control_out": listof(blob(4096), 0, 4 * vconsole.MAX_PORTS + 16)},
                      optional=("host_gone",))
    return record({})


def virtio_schema(transport: VirtioMmio) -> Schema:
    dev = transport.device
    device = record({"status": U8, "driver_features": U64, "config_generation": U32,
                     "needs_reset_reason": text(),
                     "queues": _queues(dev), "device": _device_specific(dev)})
    return record({"dev_features_sel": U32, "drv_features_sel": U32, "queue_sel": U32,
                   "shm_sel": U32, "interrupt_status": integer(0, 3), "device": device})


def _queues(dev: VirtioDevice) -> Schema:
    schemas = [queue_schema(q) for q in dev.queues]

    def check(v: Any, where: str) -> list[Any]:
        listof(lambda x, w: x, len(schemas))(v, where)
        return [s(x, f"{where}[{i}]") for i, (s, x) in enumerate(zip(schemas, v))]
    return check


def device_schema(dev: Any, num_harts: int) -> Schema:
    if isinstance(dev, Plic):
        nctx = 2 * num_harts
        sources = integer(0, (1 << NUM_SOURCES) - 1)
        return record({"priority": listof(integer(0, MAX_PRIORITY), NUM_SOURCES),
                       "pending": sources, "claimed": sources, "levels": sources,
                       "enable": listof(integer(0, SOURCE_MASK), nctx),
                       "threshold": listof(integer(0, MAX_PRIORITY), nctx)})
    if isinstance(dev, Aclint):
        return record({"msip": listof(integer(0, 1), num_harts), "mtimecmp": listof(U64, num_harts)})
    if isinstance(dev, Uart16550):
        return record({"rx": blob(FIFO_SIZE), "host": blob(HOST_QUEUE_LIMIT), "ier": integer(0, 0x0F),
                       "lcr": U8, "mcr": integer(0, 0x1F), "scr": U8, "fcr": U8, "dll": U8, "dlm": U8,
                       "lsr_err": U8, "thr_pending": boolean, "msr": U8, "dropped": U64})
    if isinstance(dev, GoldfishRtc):
        return record({"offset_ns": integer(-M64, M64), "time_high": U32, "alarm": U64,
                       "alarm_armed": boolean, "irq_enabled": boolean, "irq_pending": boolean})
    if isinstance(dev, Syscon):
        return record({})
    if isinstance(dev, VirtioMmio):
        return virtio_schema(dev)
    raise ConfigError(f"no snapshot schema for device {type(dev).__name__}")


def machine_schema(board: Any) -> Schema:
    """The schema of `VirtBoard.save_state()` for this board."""
    bus = board.bus
    devices = {name: device_schema(dev, len(board.harts)) for _, _, dev, name in bus.regions()}
    return record({
        "clock": record({"ticks": integer(0, (1 << 63) - 1)}),
        "harts": listof(hart_schema(bus.ram_size), len(board.harts)),
        "devices": record(devices),
        "tohost": optional(integer(bus.ram_base, bus.ram_end - 8)),
        "dtb_addr": integer(0, bus.ram_end),
    })


def check_state(board: Any, state: Any) -> dict[str, Any]:
    """`state` (parsed JSON) checked against `board`; bytes decoded.  ConfigError if bad."""
    return machine_schema(board)(state, "")


def encode_bytes(o: Any) -> Any:
    """json.dumps `default`: bytes and bytearrays become base64 text."""
    if isinstance(o, (bytes, bytearray)):
        return base64.b64encode(bytes(o)).decode("ascii")
    raise TypeError(f"{type(o).__name__} is not snapshot state")
