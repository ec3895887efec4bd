"""The kernel config fragment and the check that it stuck after olddefconfig."""

from __future__ import annotations

import pytest

from pyvirt.errors import BuildError
from pyvirt.images import kernel
from pyvirt.images.kernel import check_config, fragment_text, parse_config

# What the default guest needs (the image issue's list), as the fragment must ask for it.
REQUIRED = {
    "64BIT": "y", "MMU": "y", "SMP": "y", "FPU": "y", "RISCV_ISA_C": "y", "SOC_VIRT": "y",
    "RISCV_SBI": "y", "RISCV_SBI_V01": "y", "SERIAL_EARLYCON_RISCV_SBI": "y", "HVC_RISCV_SBI": "y",
    "PRINTK": "y", "TTY": "y", "SERIAL_8250": "y", "SERIAL_8250_CONSOLE": "y", "SERIAL_OF_PLATFORM": "y",
    "SIFIVE_PLIC": "y", "BLK_DEV_INITRD": "y", "DEVTMPFS": "y", "DEVTMPFS_MOUNT": "y", "PROC_FS": "y",
    "SYSFS": "y", "BINFMT_ELF": "y", "BINFMT_SCRIPT": "y", "UNIX": "y", "VIRTIO_MMIO": "y",
    "VIRTIO_BLK": "y", "HW_RANDOM": "y", "HW_RANDOM_VIRTIO": "y", "EXT4_FS": "y", "RTC_CLASS": "y",
    "RTC_DRV_GOLDFISH": "y", "POWER_RESET": "y", "POWER_RESET_SYSCON": "y",
    "POWER_RESET_SYSCON_POWEROFF": "y", "MFD_SYSCON": "y", "DEVMEM": "y", "STRICT_DEVMEM": "n",
    "IO_STRICT_DEVMEM": "n", "FUTEX": "y", "SHMEM": "y", "TMPFS": "y", "MULTIUSER": "y",
    "POSIX_TIMERS": "y", "EPOLL": "y", "SIGNALFD": "y", "TIMERFD": "y", "EVENTFD": "y", "PCI": "n",
    "MODULES": "n", "DEBUG_INFO": "n", "NET": "y", "INET": "y", "PACKET": "y", "VIRTIO_NET": "y",
}


def test_fragment_asks_for_everything_the_guest_needs() -> None:
    wanted = parse_config(fragment_text())
    for name, value in REQUIRED.items():
        assert wanted.get(f"CONFIG_{name}") == value, name
    assert int(wanted["CONFIG_NR_CPUS"]) >= 8
    # An uncompressed initramfs must do: no decompressor is asked for.
    assert not any(k.startswith("CONFIG_RD_") and v != "n" for k, v in wanted.items())


def test_parse_config() -> None:
    text = ('CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="a string"\nCONFIG_D=0x100\n'
            "# a comment\nCONFIG_A=n\n  CONFIG_E=8  \n# CONFIG_F is not set, really\n")
    assert parse_config(text) == {"CONFIG_A": "n", "CONFIG_B": "n", "CONFIG_C": "a string",
                                  "CONFIG_D": "0x100", "CONFIG_E": "8"}


def test_check_config_names_the_option_that_did_not_stick() -> None:
    wanted = parse_config("CONFIG_X=y\n# CONFIG_Y is not set\nCONFIG_N=8\nCONFIG_S=\"hi\"\n")
    check_config(wanted, 'CONFIG_X=y\nCONFIG_N=8\nCONFIG_S="hi"\n')             # Y absent counts as n
    check_config(wanted, 'CONFIG_X=y\n# CONFIG_Y is not set\nCONFIG_N=8\nCONFIG_S="hi"\n')
    cases = {
        'CONFIG_N=8\nCONFIG_S="hi"\n': "CONFIG_X=y",                              # dropped
        'CONFIG_X=m\nCONFIG_N=8\nCONFIG_S="hi"\n': "CONFIG_X=y",                  # module, not built in
        'CONFIG_X=y\nCONFIG_Y=y\nCONFIG_N=8\nCONFIG_S="hi"\n': "CONFIG_Y=n",      # forced on
        'CONFIG_X=y\nCONFIG_N=4\nCONFIG_S="hi"\n': "CONFIG_N=8",                  # other value
        'CONFIG_X=y\nCONFIG_N=8\nCONFIG_S="ho"\n': "CONFIG_S=hi",
    }
    for final, named in cases.items():
        with pytest.raises(BuildError, match=named):
            check_config(wanted, final)


def test_cache_key_follows_every_input(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("PYVIRT_CACHE", str(tmp_path))
    base = kernel.kernel_dir()
    assert base.parent == tmp_path and base.name.startswith("kernel-")
    for attr, value in (("fragment_text", lambda: "CONFIG_X=y\n"), ("source_version", lambda: "9.9"),
                        ("compiler_version", lambda: "gcc 99")):
        with monkeypatch.context() as m:
            m.setattr(kernel, attr, value)
            assert kernel.kernel_dir() != base, attr
    with monkeypatch.context() as m:
        m.setattr(kernel, "BUILDER_VERSION", "other")
        assert kernel.kernel_dir() != base
    assert kernel.kernel_dir() == base
    assert kernel.cached_kernel() is None


def test_built_kernel_config_matches_the_fragment() -> None:
    """The cached kernel (if built) really has what the fragment asks for."""
    image = kernel.cached_kernel()
    if image is None:
        pytest.skip("the default kernel is not built (pyvirt image build)")
    check_config(parse_config(fragment_text()), (image.parent / "config").read_text())
    assert image.stat().st_size < 8 << 20


def test_failed_build_step_names_its_kept_log(tmp_path) -> None:
    log = tmp_path / "kernel.log"
    make = kernel._Make(tmp_path, log, kernel.Progress())
    make.run("sh", "-c", "echo '  CC      init/main.o'")
    with pytest.raises(BuildError, match=f"failed; see {log}"):
        make.run("sh", "-c", "echo 'error: boom'; exit 2")
    text = log.read_text()
    assert "init/main.o" in text and "error: boom" in text
