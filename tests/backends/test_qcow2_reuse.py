"""A guest cannot fill the host disk through a qcow2 image: clusters freed by discards (and
copy-on-write) are used again, their space is punched out of the file, free clusters at its
end are cut off -- crash-safely (issue 14)."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from test_qcow2_errors import Recorder, needs_qemu

from pyvirt.backends import qcow2
from pyvirt.backends.qcow2 import Qcow2Backend
from pyvirt.backends.qcow2_tools import create_qcow2
from pyvirt.testing import qemu_img as q

KIB, MIB = 1 << 10, 1 << 20


def allocated(p: Path) -> int:
    return os.stat(p).st_blocks * 512


def churn(b: Qcow2Backend, rng: random.Random, size: int, rounds: int, model: bytearray | None = None) -> None:
    """The guest's loop: write a few MiB at random places, discard (or WRITE_ZEROES) some of
    it, flush."""
    for i in range(rounds):
        for _ in range(4):
            off = rng.randrange(0, size - 2 * MIB) // 4096 * 4096
            n = rng.choice((4096, 64 * KIB, 1 * MIB, 2 * MIB))
            data = bytes([i % 251 + 1]) * n
            b.write(off, data)
            if model is not None:
                model[off:off + n] = data
        off = rng.randrange(0, size - 8 * MIB) // 4096 * 4096
        n = rng.choice((64 * KIB, 4 * MIB, 8 * MIB))
        (b.discard if i % 2 else b.write_zeroes)(off, n)
        if model is not None:
            model[off:off + n] = bytes(n)
        b.flush()


@needs_qemu
def test_write_discard_loop_keeps_the_file_small(tmp_path: Path) -> None:
    size = 64 * MIB
    img = tmp_path / "d.qcow2"
    create_qcow2(img, size)
    b = Qcow2Backend(img)
    rng = random.Random(7)
    model = bytearray(size)
    deadline = time.monotonic() + 6
    rounds = 0
    while time.monotonic() < deadline or rounds < 60:
        churn(b, rng, size, 5, model)
        rounds += 5
        b.discard(0, size)                      # the guest's fstrim: everything goes
        model[:] = bytes(size)
        b.flush()
        assert img.stat().st_size < 2 * size and allocated(img) < 2 * size, rounds
    assert img.stat().st_size < 4 * MIB         # all free at the end: cut off
    churn(b, rng, size, 10, model)
    b.close()
    assert img.stat().st_size < 2 * size
    chk = q.check(img)
    assert chk["returncode"] == 0 and not chk.get("leaks") and not chk.get("corruptions"), chk
    assert q.to_raw(img) == model


@needs_qemu
def test_free_clusters_of_an_existing_image_are_used_again(tmp_path: Path) -> None:
    """Clusters a previous session freed (refcount 0 inside the file) are found and used."""
    img = tmp_path / "d.qcow2"
    create_qcow2(img, 16 * MIB)
    b = Qcow2Backend(img)
    b.write(0, b"\x07" * (8 * MIB))
    b.write(8 * MIB, b"\x08" * (64 * KIB))       # keeps the file from being cut off
    b.flush()
    b.discard(0, 8 * MIB)
    b.close()
    before = img.stat().st_size
    assert before > 8 * MIB and allocated(img) < 2 * MIB   # the space was punched out
    b = Qcow2Backend(img)
    b.write(MIB, b"\x09" * (6 * MIB))
    b.close()
    assert img.stat().st_size == before          # written into the free clusters
    assert q.check(img)["returncode"] == 0
    raw = q.to_raw(img)
    assert raw[MIB:7 * MIB] == b"\x09" * (6 * MIB) and raw[8 * MIB:8 * MIB + 4] == b"\x08" * 4


class TruncRecorder(Recorder):
    """Also records hole punches (the range reads as zeros) and truncations."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(monkeypatch)
        real_punch, real_trunc = qcow2._punch, os.ftruncate

        def punch(fd: int, off: int, n: int) -> None:
            self.events.append((off, bytes(n)))
            real_punch(fd, off, n)

        def ftruncate(fd: int, n: int) -> None:
            self.events.append(("truncate", n))
            real_trunc(fd, n)

        monkeypatch.setattr(qcow2, "_punch", punch)
        monkeypatch.setattr(qcow2.os, "ftruncate", ftruncate)


def replay(initial: bytes, events: list) -> bytes:
    f = bytearray(initial)
    for e in events:
        if e is None:
            continue
        if e[0] == "truncate":
            del f[e[1]:]
            continue
        off, data = e
        if off + len(data) > len(f):
            f += bytes(off + len(data) - len(f))
        f[off:off + len(data)] = data
    return bytes(f)


@needs_qemu
def test_reuse_is_crash_safe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replay the writes, punches and truncations of a write/discard/flush loop up to many
    points (process crashes) and with random subsets since the last fdatasync (power cuts):
    qemu-img check finds leaks at worst, and right after a flush the data is all there."""
    size = 4 * MIB
    img = q.create(tmp_path / "c.qcow2", size, cluster_size=4096)
    initial = img.read_bytes()
    rec = TruncRecorder(monkeypatch)
    b = Qcow2Backend(img)
    rng = random.Random(3)
    model = bytearray(size)
    marks: list[tuple[int, bytes]] = []
    for i in range(12):
        for _ in range(3):
            off = rng.randrange(0, size - 256 * KIB) // 512 * 512
            data = bytes([i + 1]) * rng.choice((512, 4096, 20 * KIB, 200 * KIB))
            b.write(off, data)
            model[off:off + len(data)] = data
        off = rng.randrange(0, size - 512 * KIB) // 4096 * 4096
        n = rng.choice((4096, 64 * KIB, 512 * KIB)) if i != 6 else size
        b.discard(off if i != 6 else 0, n)
        model[off if i != 6 else 0:(off if i != 6 else 0) + n] = bytes(n)
        b.flush()
        marks.append((len(rec.events), bytes(model)))
    b.close()
    events = rec.events
    assert any(e is not None and e[0] == "truncate" for e in events)

    def check_state(data: bytes, durable: bytes | None) -> None:
        p = tmp_path / "crashed.qcow2"
        p.write_bytes(data)
        chk = q.check(p)
        assert chk["returncode"] in (0, 3) and not chk.get("corruptions"), chk
        if durable is not None:
            assert q.to_raw(p) == durable
        p.unlink()

    points = set(range(0, len(events), 9)) | {m for m, _ in marks}
    for k in sorted(points):
        check_state(replay(initial, events[:k]), next((d for m, d in marks if m == k), None))
    syncs = [i for i, e in enumerate(events) if e is None]
    for s_prev, s_next in zip(syncs, syncs[1:]):
        batch = [e for e in events[s_prev + 1:s_next] if e is not None]
        if batch:
            subset = [w for w in batch if rng.random() < 0.5]
            check_state(replay(initial, events[:s_prev] + subset), None)


@needs_qemu
def test_guest_write_discard_loop(tmp_path: Path) -> None:
    """The guest's own loop (bench/qcow2_churn.py, shortened: the acceptance run is its
    default 60 s): dd, blkdiscard / blkdiscard -z, sync on a 64 MiB qcow2 disk."""
    import sys

    from pyvirt.images import cached_default_image
    if cached_default_image() is None:
        pytest.fail("the default image is not built: `make test` runs `pyvirt image build` first")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    try:
        from qcow2_churn import churn
    finally:
        sys.path.pop(0)
    r = churn(8, workdir=tmp_path, min_rounds=5)      # (rounds, not seconds: a loaded machine does fewer)
    assert r["exit"] == 0 and r["rounds"] and r["rounds"] >= 4, r["tail"]
    # (the acceptance bound is 2x; the loop's working set is one 16 MiB slot, so a file that
    # reuses its clusters stays under 1x, one that does not passes it after 4 rounds)
    assert r["size"] < r["virtual"] and r["allocated"] < r["virtual"], r
    assert r["check"]["returncode"] == 0, r["check"]


@needs_qemu
@pytest.mark.parametrize("cluster, refbits", [(512, 1), (512, 64), (4096, 2), (65536, 16), (2 << 20, 8)])
def test_reuse_across_cluster_and_refcount_sizes(tmp_path: Path, cluster: int, refbits: int) -> None:
    """Churn, close, reopen (free clusters found by scanning the refcounts), churn again:
    QEMU reads what was written and finds no leak or corruption, whatever the geometry."""
    size = 16 * MIB
    img = q.create(tmp_path / "g.qcow2", size, cluster_size=cluster, options=(f"refcount_bits={refbits}",))
    rng = random.Random(cluster ^ refbits)
    model = bytearray(size)
    for _session in range(3):
        b = Qcow2Backend(img)
        for i in range(8):
            for _ in range(3):
                off = rng.randrange(0, size - 1 * MIB) // 512 * 512
                n = rng.choice((512, 4096, 100 * KIB, 1 * MIB))
                data = bytes([rng.randrange(1, 256)]) * n
                b.write(off, data)
                model[off:off + n] = data
            off = rng.randrange(0, size - 4 * MIB) // 512 * 512
            n = rng.choice((512, 64 * KIB, 4 * MIB))
            (b.discard if i % 2 else b.write_zeroes)(off, n)
            model[off:off + n] = bytes(n)
            if i % 3 == 0:
                b.flush()
        b.close()
        chk = q.check(img)
        assert chk["returncode"] == 0 and not chk.get("leaks") and not chk.get("corruptions"), chk
        assert q.to_raw(img) == model
        assert img.stat().st_size < 2 * size + 2 * cluster + (1 * MIB if cluster < 4096 else 0)
