"""RawFileBackend on real files: I/O, locking, user errors."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pyvirt.backends import block
from pyvirt.backends.block import RawFileBackend, advance
from pyvirt.errors import ImageError
from pyvirt.testing.fakes import MemoryBlockBackend

DATA = bytes(range(256)) * 64          # 16 KiB


@pytest.fixture
def img(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(DATA)
    return p


@pytest.fixture(params=["preadv", "pread"])
def io_calls(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run with os.preadv/pwritev, and with the one-buffer-at-a-time fallback
    used where the interpreter lacks them (PyPy 3.9)."""
    if request.param == "pread":
        monkeypatch.setattr(block, "_HAVE_VECTORED", False)
    elif not block._HAVE_VECTORED:
        pytest.skip("this interpreter has no os.preadv")
    return str(request.param)


def test_vectored_read_write(img: Path, io_calls: str) -> None:
    b = RawFileBackend(img)
    assert b.size == len(DATA) and not b.read_only
    bufs = [memoryview(bytearray(n)) for n in (3, 509, 1024)]
    assert b.readv(512, bufs) == 1536
    assert b"".join(bytes(x) for x in bufs) == DATA[512:2048]
    one = memoryview(bytearray(16))
    assert b.readinto(100, one) == 16 and bytes(one) == DATA[100:116]
    assert b.writev(1024, [b"a" * 10, memoryview(b"b" * 502), bytearray(b"c" * 512)]) == 1024
    assert b.write(0, b"z" * 512) == 512
    b.flush()
    b.close()
    data = img.read_bytes()
    assert data[:512] == b"z" * 512 and data[1024:2048] == b"a" * 10 + b"b" * 502 + b"c" * 512
    assert data[2048:] == DATA[2048:]


def test_out_of_range_is_an_os_error(img: Path) -> None:
    b = RawFileBackend(img)
    with pytest.raises(OSError):
        b.readinto(len(DATA) - 8, memoryview(bytearray(16)))
    with pytest.raises(OSError):
        b.write(-512, b"x")
    b.close()
    with pytest.raises(OSError):
        b.readinto(0, memoryview(bytearray(1)))


def test_shrunk_file_reads_zeros(img: Path, io_calls: str) -> None:
    b = RawFileBackend(img)
    os.truncate(img, 1000)                        # someone else truncated the image
    buf = memoryview(bytearray(b"\xff" * 2048))
    b.readinto(0, buf)
    assert bytes(buf) == DATA[:1000] + bytes(1048)
    b.close()


def test_partial_sector_not_addressable(tmp_path: Path) -> None:
    p = tmp_path / "odd.img"
    p.write_bytes(b"\1" * 1300)
    b = RawFileBackend(p)
    assert b.size == 1024
    b.close()


def test_read_only(img: Path) -> None:
    b = RawFileBackend(img, read_only=True)
    assert b.read_only
    with pytest.raises(OSError) as e:
        b.write(0, b"x" * 512)
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError):
        b.discard(0, 512)
    b.flush()                                     # nothing to flush: fine
    b.close()
    assert img.read_bytes() == DATA


def test_discard_leaves_the_rest(img: Path) -> None:
    b = RawFileBackend(img)
    b.discard(4096, 4096)                         # advisory: may or may not free blocks
    b.discard(0, 0)
    buf = memoryview(bytearray(4096))
    b.readinto(0, buf)
    assert bytes(buf) == DATA[:4096]
    b.readinto(8192, buf)
    assert bytes(buf) == DATA[8192:12288]
    b.close()


def test_missing_directory_and_special_files(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        RawFileBackend(tmp_path / "nope.img")
    with pytest.raises(ImageError, match="is a directory"):
        RawFileBackend(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        RawFileBackend(fifo)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(img: Path) -> None:
    img.chmod(0)
    with pytest.raises(ImageError, match="permission"):
        RawFileBackend(img)


def test_error_messages_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as e:
        RawFileBackend(tmp_path / "x" / "y.img")
    assert "\n" not in str(e.value)


def test_locking(img: Path) -> None:
    first = RawFileBackend(img)
    with pytest.raises(ImageError, match="in use by another VM"):
        RawFileBackend(img)
    with pytest.raises(ImageError, match="in use by another VM"):
        RawFileBackend(img, read_only=True)       # a writer excludes readers too
    first.close()
    first.close()                                 # idempotent
    r1, r2 = RawFileBackend(img, read_only=True), RawFileBackend(img, read_only=True)
    with pytest.raises(ImageError, match="in use"):
        RawFileBackend(img)                       # readers exclude a writer
    r1.close()
    r2.close()
    RawFileBackend(img).close()


def test_lock_held_by_another_process(img: Path) -> None:
    ready_r, ready_w = os.pipe()                  # child -> parent: "I hold it"
    done_r, done_w = os.pipe()                    # parent -> child: "let go"
    pid = os.fork()
    if pid == 0:
        try:
            b = RawFileBackend(img)
            os.write(ready_w, b"1")
            os.read(done_r, 1)
            b.close()
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        with pytest.raises(ImageError, match="in use by another VM"):
            RawFileBackend(img)
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)
    RawFileBackend(img).close()


def test_save_load_checks_size(img: Path, tmp_path: Path) -> None:
    b = RawFileBackend(img)
    state = b.save()
    assert state["size"] == len(DATA)
    b.load(state)
    other = tmp_path / "small.img"
    other.write_bytes(bytes(512))
    s = RawFileBackend(other)
    with pytest.raises(ImageError):
        s.load(state)
    b.close()
    s.close()


def test_advance() -> None:
    bufs = [b"abc", bytearray(b"de"), memoryview(b"fghi")]
    assert b"".join(bytes(x) for x in advance(bufs, 4)) == b"efghi"
    assert advance(bufs, 9) == []


def test_memory_backend_double() -> None:
    m = MemoryBlockBackend(size=2048)
    m.writev(512, [b"x" * 256, b"y" * 256])
    buf = memoryview(bytearray(512))
    m.readinto(512, buf)
    assert bytes(buf) == b"x" * 256 + b"y" * 256
    m.discard(512, 512)
    m.readinto(512, buf)
    assert bytes(buf) == bytes(512) and m.discards == [(512, 512)]
    with pytest.raises(OSError):
        m.readinto(2000, buf)
    with pytest.raises(ValueError):
        MemoryBlockBackend(size=100)


def test_an_image_without_write_bits_is_not_written_even_by_root(tmp_path: Path) -> None:
    """A snapshot freezes a disk image by removing its write bits; root, whom the kernel lets
    write anyway, must not open it for writing either (issue 14)."""
    from pyvirt.backends.block import RawFileBackend
    from pyvirt.errors import ImageError
    p = tmp_path / "frozen.raw"
    p.write_bytes(bytes(4096))
    p.chmod(0o444)
    with pytest.raises(ImageError, match="read-only"):
        RawFileBackend(p)
    RawFileBackend(p, read_only=True).close()
