"""qcow2 under hypothesis: corrupted metadata never gets past ImageError (no other exception,
no hang, no write outside the file; the refcount check just reports), and random writes, discards, flushes and reopenings
read back as an in-memory model says -- and as qemu-img reads them."""

from __future__ import annotations

import signal
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyvirt.backends import qcow2
from pyvirt.backends.qcow2 import Qcow2Backend
from pyvirt.backends.qcow2_tools import check_qcow2, create_qcow2
from pyvirt.errors import ImageError
from pyvirt.testing import qemu_img as q

pytestmark = pytest.mark.skipif(q.QEMU_IMG is None or q.QEMU_IO is None,
                                reason="needs qemu-img and qemu-io (Debian: qemu-utils)")

KIB, MIB = 1 << 10, 1 << 20


@dataclass
class Template:
    data: bytes
    cluster_size: int
    regions: list[tuple[str, int, int]]        # (what, start, end) of every metadata structure


def _regions(path: Path) -> tuple[int, list[tuple[str, int, int]]]:
    b = Qcow2Backend(path, read_only=True, open_backing_file=False)
    h, cs = b.header, b.cluster_size
    out = [("header", 0, min(cs, 1024)), ("L1", h.l1_offset, h.l1_offset + h.l1_size * 8),
           ("refcount table", h.rt_offset, h.rt_offset + 64)]
    disk_clusters = -(-h.size // cs)
    file_clusters = -(-len(path.read_bytes()) // cs)
    for i, (e,) in enumerate(struct.iter_unpack(">Q", b._l1)):   # the entries that map the disk
        if e & qcow2.OFFSET_MASK:
            n = min(cs // 8, disk_clusters - i * (cs // 8))
            out.append(("L2", e & qcow2.OFFSET_MASK, (e & qcow2.OFFSET_MASK) + 8 * n))
    for (e,) in struct.iter_unpack(">Q", b._rt):                 # the counts of existing clusters
        if e:
            out.append(("refcount block", e, e + min(cs, -(-file_clusters * b._rc_bits // 8))))
    b.close()
    return cs, out


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Template]:
    d = tmp_path_factory.mktemp("templates")
    made: dict[str, Path] = {}
    p = q.create(d / "qemu64k.qcow2", 1 * MIB)
    q.qemu_io(p, "write -P 1 0 100k", "write -z 192k 64k", "write -P 2 320k 64k", "write -z 320k 64k")
    made["qemu64k"] = p
    base = d / "base.raw"
    base.write_bytes(bytes(range(256)) * (2 * KIB))
    p = q.create(d / "overlay4k.qcow2", 1 * MIB, cluster_size=4 * KIB, backing=base, backing_fmt="raw")
    q.qemu_io(p, "write -P 3 8k 20k", "write -z 64k 8k", "write -P 4 900k 12k")
    made["overlay4k"] = p
    raw = d / "text.raw"
    raw.write_bytes(b"compressible text " * (512 * KIB // 18) + bytes(512 * KIB - 512 * KIB // 18 * 18))
    p = d / "compressed.qcow2"
    q.qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", raw, p)
    made["compressed"] = p
    p = d / "pyvirt512.qcow2"
    create_qcow2(p, 512 * KIB, cluster_size=512)
    b = Qcow2Backend(p)
    for i in range(0, 512 * KIB, 24 * KIB):
        b.write(i, bytes([i // KIB % 251 + 1]) * 5000)
    b.close()
    made["pyvirt512"] = p
    out = {}
    for name, path in made.items():
        cs, regions = _regions(path)
        out[name] = Template(path.read_bytes(), cs, regions)
    return out


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def fire(signum, frame):
        raise TimeoutError(f"no answer in {seconds} s: a hang")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextmanager
def writes_bounded(limit: int) -> Iterator[list[tuple[int, int]]]:
    """Fail any write by the qcow2 backend that ends past `limit` bytes of its file."""
    seen: list[tuple[int, int]] = []
    real = qcow2._pwritev

    def pwritev(fd, bufs, offset):
        n = sum(memoryview(x).nbytes for x in bufs)
        seen.append((offset, n))
        assert 0 <= offset and offset + n <= limit, f"write of {n} at {offset:#x}: outside the file"
        return real(fd, bufs, offset)
    with mock.patch.object(qcow2, "_pwritev", pwritev):
        yield seen


def read_all(b: Qcow2Backend) -> bytes:
    buf = bytearray(b.size)
    b.readinto(0, memoryview(buf))
    return bytes(buf)


ENTRY_VALUES = [0, (1 << 64) - 1, qcow2.COPIED, qcow2.COPIED | (1 << 50), qcow2.COPIED | 0x10000,
                qcow2.COPIED | 0x200, 1, qcow2.COMPRESSED | 0x10000, qcow2.COMPRESSED | (1 << 40)]


@settings(max_examples=1000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_corrupt_metadata_gives_image_error_or_consistent_data(templates: dict[str, Template],
                                                               tmp_path: Path, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(templates)), label="template")
    t = templates[name]
    img = bytearray(t.data)
    for _ in range(data.draw(st.integers(1, 4), label="damages")):
        what, start, end = data.draw(st.sampled_from(t.regions), label="region")
        how = data.draw(st.sampled_from(["byte", "bit", "entry"]), label="how")
        pos = data.draw(st.integers(start, max(start, min(end, len(img)) - 1)), label="at")
        if pos >= len(img):
            continue
        if how == "byte":
            img[pos] = data.draw(st.integers(0, 255))
        elif how == "bit":
            img[pos] ^= 1 << data.draw(st.integers(0, 7))
        else:
            pos -= pos % 8
            clusters = len(img) // t.cluster_size + 4
            v = data.draw(st.one_of(st.sampled_from(ENTRY_VALUES),
                                    st.integers(0, len(img) + 4 * t.cluster_size).map(
                                        lambda o: qcow2.COPIED | o),
                                    st.integers(0, clusters).map(           # any cluster, aligned
                                        lambda c: qcow2.COPIED | c * t.cluster_size)))
            img[pos:pos + 8] = struct.pack(">Q", v & ((1 << 64) - 1))
    path = tmp_path / f"fuzz-{name}.qcow2"
    path.write_bytes(bytes(img))
    read_only = data.draw(st.booleans(), label="read_only")
    cs = t.cluster_size
    limit = -(-len(img) // cs) * cs + 64 * cs        # what a few small writes may add
    with time_limit(10), writes_bounded(limit):
        try:
            b = Qcow2Backend(path, read_only=read_only)
        except ImageError as e:
            assert "\n" not in str(e)
            event("refused at open")
            return
        try:
            check_qcow2(b)                                       # reports, never raises
            try:
                first = read_all(b)
                assert read_all(b) == first                      # the same twice
                event("read whole disk")
            except ImageError:
                event("read failed")
            last = None
            if not read_only:
                for _ in range(5):
                    off = data.draw(st.integers(0, b.size - 1), label="write at")
                    n = data.draw(st.integers(1, min(cs - off % cs, b.size - off)), label="length")
                    payload = bytes([data.draw(st.integers(1, 255))]) * n
                    try:
                        b.write(off, payload)
                        got = bytearray(n)
                        b.readinto(off, memoryview(got))
                        assert got == payload                    # what was written reads back
                        event("write read back")
                        last = (off, payload)
                    except ImageError:
                        event("write failed")
                try:
                    b.flush()
                except ImageError:
                    pass
        finally:
            try:
                b.close()
            except ImageError:
                last = None
        # What opened before opens again, and the last write is in the file, not only in
        # the backend's memory (no data write landed on metadata).
        b = Qcow2Backend(path, read_only=True)
        if last is not None:
            got = bytearray(len(last[1]))
            b.readinto(last[0], memoryview(got))
            assert got == last[1]
            event("last write read after reopening")
        b.close()
    after = path.read_bytes()
    assert after[:8] == bytes(img[:8]) and len(after) <= limit


# -- random operations against a model -------------------------------------------------------------
SIZE = 256 * KIB

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE - 1), st.integers(1, 20 * KIB), st.integers(1, 255)),
    st.tuples(st.just("write512"), st.integers(0, SIZE // 512 - 1), st.integers(1, 40), st.integers(1, 255)),
    st.tuples(st.just("discard"), st.integers(0, SIZE - 1), st.integers(1, 40 * KIB), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(0)),
)


@pytest.mark.parametrize("cs, backing", [(512, False), (4 * KIB, True), (64 * KIB, False), (64 * KIB, True)])
def test_random_operations_match_a_model(tmp_path: Path, cs: int, backing: bool) -> None:
    base = None
    initial = bytes(SIZE)
    if backing:
        base = tmp_path / "base.raw"
        initial = bytes(range(1, 256)) * (SIZE // 255) + bytes(range(1, SIZE % 255 + 1))
        base.write_bytes(initial[:SIZE - 1000])           # shorter than the disk
        initial = initial[:SIZE - 1000] + bytes(1000)
    counter = iter(range(1 << 30))

    @settings(max_examples=30, deadline=None, derandomize=True)
    @given(ops=st.lists(op, max_size=25))
    def run(ops: list[tuple[str, int, int, int]]) -> None:
        img = tmp_path / f"m{next(counter)}.qcow2"
        create_qcow2(img, SIZE, cluster_size=cs, backing=base, backing_format="raw" if base else None)
        model = bytearray(initial)
        b = Qcow2Backend(img)
        try:
            for kind, a, n, v in ops:
                if kind == "write":
                    n = min(n, SIZE - a)
                    b.write(a, bytes([v]) * n)
                    model[a:a + n] = bytes([v]) * n
                elif kind == "write512":
                    a *= 512
                    n = min(n * 512, SIZE - a)
                    b.writev(a, [bytes([v]) * (n // 2), bytes([v ^ 0xFF]) * (n - n // 2)])
                    model[a:a + n] = bytes([v]) * (n // 2) + bytes([v ^ 0xFF]) * (n - n // 2)
                elif kind == "discard":
                    n = min(n, SIZE - a)
                    b.discard(a, n)
                    model[a:a + n] = bytes(n)
                elif kind == "flush":
                    b.flush()
                else:
                    b.close()
                    b = Qcow2Backend(img)
                assert read_all(b)[max(0, a - 600):a + n + 600] == model[max(0, a - 600):a + n + 600]
            assert read_all(b) == model
            r = check_qcow2(b)
            assert not r.errors and r.leaks == 0, r
        finally:
            b.close()
        chk = q.check(img)
        assert chk["returncode"] == 0, chk
        assert q.to_raw(img) == model
        img.unlink()

    run()
