"""Every component whose state goes into a snapshot declares its state schema beside its
save()/load() (`state_schema()`, built from pyvirt/state.py; vmm/snapcheck.py only asks for
it), so a new device cannot forget it: a class that saves state declares the schema in the
same class body, and a virtio device that saves state of its own (`save_device()`) declares
`device_state_schema()` beside it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import pyvirt.devices
from pyvirt.clock import Clock
from pyvirt.cpu.riscv.hart import Hart
from pyvirt.devices.virtio.device import VirtioDevice
from pyvirt.testing.clock import MockClock


def _classes() -> list[type]:
    out: list[type] = []
    for info in pkgutil.walk_packages(pyvirt.devices.__path__, "pyvirt.devices."):
        module = importlib.import_module(info.name)
        out += [
            cls
            for _, cls in inspect.getmembers(module, inspect.isclass)
            if cls.__module__ == module.__name__ and not getattr(cls, "_is_protocol", False)
        ]
    return out


def _owner(cls: type, name: str) -> type | None:
    """The class in cls's MRO whose body defines `name`."""
    return next((c for c in cls.__mro__ if name in vars(c)), None)


DEVICE_CLASSES = [cls for cls in _classes() if hasattr(cls, "save") and hasattr(cls, "load")]
STATEFUL = DEVICE_CLASSES + [Hart, Clock, MockClock]


def test_the_device_classes_are_found() -> None:
    names = {cls.__name__ for cls in DEVICE_CLASSES}
    assert {
        "Plic",
        "Aclint",
        "Uart16550",
        "GoldfishRtc",
        "Syscon",
        "VirtioMmio",
        "SplitQueue",
        "VirtioBlk",
        "VirtioNet",
        "VirtioConsole",
        "VirtioRng",
    } <= names


@pytest.mark.parametrize("cls", STATEFUL, ids=lambda c: c.__name__)
def test_state_schema_is_declared_beside_save_and_load(cls: type) -> None:
    owner = _owner(cls, "save")
    assert owner is not None and _owner(cls, "load") is owner
    assert "state_schema" in vars(owner), (
        f"{owner.__module__}.{owner.__name__} has save()/load() but no state_schema() beside them"
    )


@pytest.mark.parametrize(
    "cls", [c for c in DEVICE_CLASSES if issubclass(c, VirtioDevice)], ids=lambda c: c.__name__
)
def test_virtio_device_state_schema_is_declared_beside_save_device(cls: type) -> None:
    owner = _owner(cls, "save_device")
    assert owner is not None and _owner(cls, "load_device") is owner
    assert "device_state_schema" in vars(owner), (
        f"{owner.__module__}.{owner.__name__} has save_device()/load_device() but no "
        "device_state_schema() beside them"
    )
