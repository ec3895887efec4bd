"""The native engine's persistent code cache (cpu/riscv/codecache.py), and the dispatch
paths that came with it (page-straddling instructions kept, failed chains repaired).

Each test runs a small M-mode program on a fresh bus, hart and native engine whose code
cache lives in a temporary directory, saves it, and runs again with a new engine that
loads it: the second run must place the first run's code only where the guest bytes are
the same, and behave exactly as if it had translated everything itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvirt.clock import Clock
from pyvirt.cpu.riscv import codecache, native
from pyvirt.cpu.riscv import engine as engine_mod
from pyvirt.cpu.riscv.codecache import CodeCache
from pyvirt.cpu.riscv.engine import Engine
from pyvirt.cpu.riscv.hart import Hart
from pyvirt.memory import Bus

pytestmark = pytest.mark.skipif(not native.available(), reason="the native engine needs x86-64 Linux")

BASE = 0x8000_0000


@pytest.fixture(autouse=True)
def _save_small_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """These programs make a handful of blocks: save them (a real boot makes thousands)."""
    monkeypatch.setattr(codecache, "MIN_NEW", 1)
JAL_SELF = 0x0000006F                     # jal x0, 0: spin here


def addi(rd: int, rs1: int, imm: int) -> int:
    return ((imm & 0xFFF) << 20) | (rs1 << 15) | (rd << 7) | 0x13


def program(k: int) -> list[int]:
    """x5 = k; x6 = x5 + 1; x7 = x6 + x5 (add); spin."""
    add_x7 = (5 << 20) | (6 << 15) | (7 << 7) | 0x33
    return [addi(5, 0, k), addi(6, 5, 1), add_x7, JAL_SELF]


def run(directory: Path, words: list[int], *, after: list[tuple[int, int]] | None = None,
        max_file: int = codecache.MAX_FILE, at: tuple[int, ...] = (BASE,)) -> tuple[Hart, Engine, CodeCache]:
    """Run `words` at BASE for a while (then, for each (address, word) in `after`, store it
    through the bus and run on from BASE); save the cache; (hart, engine, cache).  With
    `at`, a copy of `words` at each of those addresses, run one after the other."""
    bus = Bus(BASE, 1 << 20)
    for base in at:
        for i, w in enumerate(words):
            bus.write(base + 4 * i, 4, w)
    cache = CodeCache(directory, max_file=max_file)
    eng = Engine(bus, "native", code_cache=cache)
    hart = Hart(0, bus, Clock(), native_regs=True)
    eng.add_hart(hart)
    for base in at:
        hart.pc = base
        eng.run(hart, 2000)
    for addr, w in after or []:
        bus.write(addr, 4, w)
        hart.pc = BASE
        eng.run(hart, 2000)
    eng.close()
    return hart, eng, cache


def test_second_run_places_the_first_runs_code(tmp_path: Path) -> None:
    h1, _, c1 = run(tmp_path, program(5))
    assert c1.stats["stored"] >= 2 and c1.stats["hits"] == 0
    assert (h1.x[5], h1.x[6], h1.x[7]) == (5, 6, 11)
    h2, e2, c2 = run(tmp_path, program(5))
    assert c2.stats["loaded"] == c1.stats["stored"]
    assert c2.stats["hits"] == c1.stats["stored"] and c2.stats["stored"] == 0
    assert (h2.x[5], h2.x[6], h2.x[7]) == (5, 6, 11)
    # What was placed is byte for byte what the translator makes from these bytes.
    insns = e2._decode_block(BASE, BASE >> 12)
    fresh = native.Translator()
    done = fresh.translate(insns, 3)
    assert done is not None
    cut = done[1]
    assert c2.lookup(3, BASE, e2._page(BASE >> 12)) == (*fresh.last, cut)


def pc_program() -> list[int]:
    """x10 = pc + 0x1000 (auipc); x1 = the link of a jal over one instruction; x12 = 2;
    a loop that counts x13 up to 3 (a backward branch); spin.  Every pc constant kind."""
    return [addi(13, 0, 0),
            0x1 << 12 | 10 << 7 | 0x17,             # auipc x10, 0x1
            4 << 21 | 1 << 7 | 0x6F,                # jal x1, +8
            addi(11, 0, 1),                         # (skipped)
            addi(12, 0, 2),
            addi(13, 13, 1),                        # loop: x13 += 1
            addi(14, 0, 3),
            bne(13, 14, -8),                        # bne x13, x14, loop
            JAL_SELF]


def bne(rs1: int, rs2: int, off: int) -> int:
    o = off & 0x1FFF
    return ((o >> 12 & 1) << 31 | (o >> 5 & 0x3F) << 25 | rs2 << 20 | rs1 << 15 | 1 << 12
            | (o >> 1 & 0xF) << 8 | (o >> 11 & 1) << 7 | 0x63)


def _pc_results(h: Hart, base: int) -> None:
    assert (h.x[10], h.x[1], h.x[11], h.x[12], h.x[13]) == (base + 0x1004, base + 12, 0, 2, 3)


@pytest.mark.parametrize("second", [BASE + 0x5000, BASE + 0x3_0000 + 0xFFF000 % 0x10000])
def test_the_same_bytes_at_another_virtual_page_reuse_the_same_code(tmp_path: Path, second: int) -> None:
    """Address-space randomisation puts the same library at new addresses in every
    process: an entry made at one page is placed at another as it is, and is byte for
    byte what the translator makes there (its pc constants come from the entry pc)."""
    h1, e1, c1 = run(tmp_path, pc_program())
    _pc_results(h1, BASE)
    assert len(e1.shared) == c1.stats["stored"]
    h2, e2, c2 = run(tmp_path, pc_program(), at=(second,))
    _pc_results(h2, second)
    assert c2.stats["stored"] == 0 and c2.stats["hits"] == c1.stats["stored"] >= 3
    pcs = sorted(pc for _, pc, _ in e2.block_keys())
    assert len(pcs) >= 3 and pcs[0] == second
    for pc in pcs:
        hit = c2.lookup(3, pc, e2._page(pc >> 12))
        fresh = native.Translator()
        done = fresh.translate(e2._decode_block(pc, pc >> 12), 3)
        assert hit is not None and done is not None and hit == (*fresh.last, done[1])


def test_a_run_reuses_its_own_entries_at_another_page(tmp_path: Path) -> None:
    """Within one run (no file yet): the second copy of the code is placed from the
    first one's entries, read back from the run's spool."""
    h, e, c = run(tmp_path, pc_program(), at=(BASE, BASE + 0x9000))
    _pc_results(h, BASE + 0x9000)
    assert c.stats["stored"] >= 3 and c.stats["hits"] == c.stats["stored"]
    assert e.stats["invalidated"] == 0


def test_changed_page_content_is_translated_afresh(tmp_path: Path) -> None:
    run(tmp_path, program(5))
    h, _, c = run(tmp_path, program(9))
    assert (h.x[5], h.x[6], h.x[7]) == (9, 10, 19)
    assert c.stats["stored"] == 1            # the first block: its bytes changed
    assert c.stats["hits"] == 1              # the spin loop's did not


def test_bytes_outside_the_footprint_do_not_matter(tmp_path: Path) -> None:
    run(tmp_path, program(5) + [0x12345678])
    h, _, c = run(tmp_path, program(5) + [0x0BADC0DE])
    assert c.stats["stored"] == 0 and c.stats["hits"] == 2
    assert h.x[7] == 11


def test_self_modifying_code_after_a_hit(tmp_path: Path) -> None:
    """A hit block is watched like a translated one: a store into it drops it, and the
    next lookup (the bytes no longer match) translates the new code."""
    run(tmp_path, program(5))
    h, e, c = run(tmp_path, program(5), after=[(BASE, addi(5, 0, 40))])
    assert (h.x[5], h.x[6], h.x[7]) == (40, 41, 81)
    assert e.stats["invalidated"] >= 1
    # The store dropped the page's two blocks; the spin loop's bytes are the same: a hit again.
    assert c.stats["hits"] == 3 and c.stats["stored"] == 1


def test_remapped_page_with_other_bytes_misses(tmp_path: Path) -> None:
    """The same page offset fetched from another physical page, at the same or another
    virtual page: hits only if the footprint's bytes are the same there."""
    run(tmp_path, program(5))
    c = CodeCache(tmp_path)
    same = bytearray(4096)
    for i, w in enumerate(program(5)):
        same[4 * i:4 * i + 4] = w.to_bytes(4, "little")
    other = bytearray(same)
    other[4:8] = addi(6, 5, 2).to_bytes(4, "little")
    same[100:200] = os.urandom(100)          # past the footprint
    assert c.lookup(3, BASE, same) is not None
    assert c.lookup(3, BASE, other) is None
    assert c.lookup(1, BASE, same) is None   # another privilege
    assert c.lookup(3, BASE + 4, same) is None     # another page offset
    assert c.lookup(3, BASE + 0x7000, same) is not None   # another virtual page: the same code
    assert c.lookup(3, BASE + 0x7000, other) is None


def _cache_file(directory: Path) -> Path:
    (path,) = directory.glob("native-*.bin")
    return path


@pytest.mark.parametrize("damage", ["flip_code", "flip_count", "flip_mac", "truncate", "append", "empty"])
def test_damaged_file_is_ignored(tmp_path: Path, damage: str) -> None:
    run(tmp_path, program(5))
    path = _cache_file(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "flip_code":
        data[-1] ^= 0xC3
    elif damage == "flip_count":
        data[40] ^= 1
    elif damage == "flip_mac":
        data[60] ^= 1
    elif damage == "truncate":
        del data[-5:]
    elif damage == "append":
        data += b"\x90" * 16
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    h, _, c = run(tmp_path, program(5))
    assert c.stats["loaded"] == 0 and c.stats["hits"] == 0
    assert c.stats["rejected"] == 1
    assert h.x[7] == 11
    # ... and the run wrote a good file over it.
    assert CodeCache(tmp_path).stats["loaded"] == c.stats["stored"]


def test_file_from_another_key_is_ignored(tmp_path: Path) -> None:
    """A well-formed file that this directory's key did not sign (someone else's cache,
    or a forged one) is not trusted."""
    run(tmp_path / "a", program(5))
    (tmp_path / "b").mkdir(mode=0o700)
    CodeCache(tmp_path / "b")                 # makes b's key
    src = _cache_file(tmp_path / "a")
    (tmp_path / "b" / src.name).write_bytes(src.read_bytes())
    c = CodeCache(tmp_path / "b")
    assert c.stats["loaded"] == 0 and c.stats["rejected"] == 1


def test_file_of_another_translator_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run(tmp_path, program(5))
    monkeypatch.setattr(codecache, "_DIGEST", bytes(32))
    c = CodeCache(tmp_path)
    assert c.path != _cache_file(tmp_path)
    c.path.write_bytes(_cache_file(tmp_path).read_bytes())     # same key, other version
    assert CodeCache(tmp_path).stats == {**c.stats, "rejected": 1}


def test_unsafe_directory_or_key_disables_the_cache(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    c = CodeCache(d)
    assert c._key is None
    h, _, c2 = run(d, program(5))
    assert h.x[7] == 11 and not list(d.glob("native-*.bin"))
    k = tmp_path / "k"
    k.mkdir(mode=0o700)
    (k / "key").symlink_to(tmp_path / "elsewhere")
    assert CodeCache(k)._key is None


def test_file_size_is_bounded(tmp_path: Path) -> None:
    """Many blocks, a small bound: the file never exceeds it and what fits still hits."""
    words = [addi(5, 5, 1), 0x0000006F | (2 << 21)] * 200   # addi; jal x0, +4 (the next addi)
    words.append(JAL_SELF)
    _, _, c_all = run(tmp_path / "all", words)
    bound = _cache_file(tmp_path / "all").stat().st_size // 2
    h1, _, c1 = run(tmp_path, words, max_file=bound)
    assert h1.x[5] == 200
    assert 0 < c1.stats["stored"] < c_all.stats["stored"]     # a run's new entries: half the bound
    assert 0 < _cache_file(tmp_path).stat().st_size <= bound
    h2, _, c2 = run(tmp_path, words, max_file=bound)
    assert h2.x[5] == 200
    assert c2.stats["loaded"] == c1.stats["stored"] and c2.stats["hits"] == c2.stats["loaded"]
    assert c2.stats["stored"] > 0
    assert _cache_file(tmp_path).stat().st_size <= bound


def test_old_versions_are_pruned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for v in range(codecache.KEEP_FILES + 2):
        monkeypatch.setattr(codecache, "_DIGEST", bytes([v]) * 32)
        run(tmp_path, program(5))
    assert len(list(tmp_path.glob("native-*.bin"))) == codecache.KEEP_FILES
    assert not list(tmp_path.glob(".native-*"))


def test_footprint_runs() -> None:
    from pyvirt.cpu.riscv.decode import decode

    a, c = decode(addi(5, 0, 1)), decode(0x0505)          # addi and c.addi a0, 1
    at = 0x8000_0FF0
    assert codecache.footprint([(a, at), (c, at + 4), (a, at + 6)], None) == ((0xFF0, 10),)
    # A direct jump back inside the page: two runs; the half word that stopped decoding.
    assert codecache.footprint([(a, at), (a, at - 0x100)], None) == ((0xFF0, 4), (0xEF0, 4))
    assert codecache.footprint([(a, at + 8), (c, at + 0xC)], 0xFFE) == ((0xFF8, 8),)
    assert codecache.footprint([(a, at)], 0xFFE) == ((0xFF0, 4), (0xFFE, 2))


def test_few_new_entries_leave_the_file_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codecache, "MIN_NEW", 3)
    run(tmp_path, program(5))
    assert not list(tmp_path.glob("native-*.bin"))     # 2 new entries: too few for a file
    monkeypatch.setattr(codecache, "MIN_NEW", 1)
    run(tmp_path, program(5))
    before = _cache_file(tmp_path).read_bytes()
    monkeypatch.setattr(codecache, "SAVE_FRACTION", 1)      # now 1 new of 2 loaded is too few
    _, _, c = run(tmp_path, program(9))
    assert c.stats["stored"] == 1 and _cache_file(tmp_path).read_bytes() == before
    monkeypatch.setattr(codecache, "SAVE_FRACTION", 2)
    run(tmp_path, program(9))
    assert CodeCache(tmp_path).stats["loaded"] == 3


def test_temporary_files_of_dead_runs_are_removed(tmp_path: Path) -> None:
    CodeCache(tmp_path).save()               # makes the directory and key; nothing to save
    dead = tmp_path / ".native-999999999-0000.tmp"      # (above any pid_max)
    live = tmp_path / f".native-{os.getpid()}-0000.tmp"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    c = CodeCache(tmp_path)
    assert not dead.exists() and live.exists()
    assert c.save() is False                 # nothing stored: its own temporary file goes
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "key"]


def test_one_file_per_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYVIRT_CODE_CACHE", "on")
    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    k1.write_bytes(b"one")
    k2.write_bytes(b"two")
    a, b = codecache.for_board(tmp_path, k1), codecache.for_board(tmp_path, k2)
    assert a is not None and b is not None and a.path != b.path
    assert a.path.parent == tmp_path / "code"
    same = codecache.for_board(tmp_path, k1)
    assert same is not None and same.path == a.path
    (tmp_path / "copy").write_bytes(b"one")            # the same kernel elsewhere (a build's scratch copy)
    copy = codecache.for_board(tmp_path, tmp_path / "copy")
    assert copy is not None and copy.path == a.path
    monkeypatch.setenv("PYVIRT_CODE_CACHE", "off")
    assert codecache.for_board(tmp_path, k1) is None
    with pytest.raises(ValueError):
        CodeCache(tmp_path, "../x")


def _jal(offset: int) -> int:
    """jal x0, offset."""
    imm = offset & 0x1FFFFF
    return (((imm >> 20) & 1) << 31 | ((imm >> 1) & 0x3FF) << 21 | ((imm >> 11) & 1) << 20
            | ((imm >> 12) & 0xFF) << 12 | 0x6F)


@pytest.mark.parametrize("engine", ["native", "jit", "interp"])
def test_page_straddling_instruction_rewritten(engine: str) -> None:
    """A 32-bit instruction straddling two pages runs as a block of its own after its first
    time, kept under both pages; rewritten into a 16-bit one (and a c.nop after it), the
    next runs do the new one."""
    bus = Bus(BASE, 1 << 20)
    bus.write(BASE, 4, addi(5, 5, 1))
    bus.write(BASE + 4, 4, _jal(0xFFE - 4))
    bus.write(BASE + 0xFFE, 2, addi(6, 6, 3) & 0xFFFF)
    bus.write(BASE + 0x1000, 2, addi(6, 6, 3) >> 16)
    bus.write(BASE + 0x1002, 4, _jal(-0x1002))
    eng = Engine(bus, engine, hot=2)
    hart = Hart(0, bus, Clock(), native_regs=engine == "native")
    eng.add_hart(hart)
    hart.pc = BASE
    eng.run(hart, 400)
    x5, x6 = hart.x[5], hart.x[6]
    assert x5 > 20 and x6 in (3 * x5, 3 * (x5 - 1))
    key = (hart.priv, BASE + 0xFFE, BASE >> 12)
    assert key in eng.blocks and not eng.crossing
    assert key in eng.page_keys[BASE >> 12] and key in eng.page_keys[(BASE >> 12) + 1]
    c_addi_x6_5 = 0x0001 | 6 << 7 | 5 << 2
    bus.write(BASE + 0xFFE, 2, c_addi_x6_5)
    bus.write(BASE + 0x1000, 2, 0x0001)                 # c.nop
    hart.x[5] = hart.x[6] = 0
    hart.pc = BASE
    eng.run(hart, 400)
    x5, x6 = hart.x[5], hart.x[6]
    assert x5 > 20 and x6 in (5 * x5, 5 * (x5 - 1))


@pytest.mark.parametrize("engine", ["native", "jit", "interp"])
def test_a_straddling_instruction_follows_the_second_page_of_each_address_space(engine: str) -> None:
    """Two address spaces (ASIDs 1 and 2, switched without sfence.vma) map the same page
    before a boundary and different pages after it: the instruction straddling the boundary
    is addi x6, x6, 3 in one and addi x6, x6, 5 in the other (the immediate is in the
    second half).  Each runs its own, back and forth, though its first page is the same."""
    va = 0x4000_1000
    bus = Bus(BASE, 4 << 20)
    p1, p2a, p2b = BASE + 0x20_0000, BASE + 0x20_1000, BASE + 0x20_2000
    roots = {}
    for asid, (root, p2) in {1: (BASE + 0x10_0000, p2a), 2: (BASE + 0x18_0000, p2b)}.items():
        l1, l0 = root + 0x1000, root + 0x2000
        bus.write(root + 8 * 1, 8, ((l1 >> 12) << 10) | 1)
        bus.write(l1, 8, ((l0 >> 12) << 10) | 1)
        bus.write(l0 + 8 * ((va >> 12) & 0x1FF), 8, ((p1 >> 12) << 10) | 0xCF)          # V R W X A D
        bus.write(l0 + 8 * (((va >> 12) + 1) & 0x1FF), 8, ((p2 >> 12) << 10) | 0xCF)
        roots[asid] = (8 << 60) | (asid << 44) | (root >> 12)
    bus.write(p1 + 0xFFE, 2, addi(6, 6, 3) & 0xFFFF)           # the same low half: rd, rs1's low bit
    bus.write(p2a, 2, addi(6, 6, 3) >> 16)
    bus.write(p2b, 2, addi(6, 6, 5) >> 16)
    for p2 in (p2a, p2b):
        bus.write(p2 + 2, 4, _jal(-4))                          # back to the straddling instruction
    eng = Engine(bus, engine, hot=2)
    h = Hart(0, bus, Clock(), native_regs=engine == "native")
    eng.add_hart(h)
    h.set_priv(1)
    for asid in (1, 2, 1, 2):
        h.write_satp(roots[asid])
        h.x[6] = 0
        h.pc = va + 0xFFE
        ran = eng.run(h, 400)
        step = 3 if asid == 1 else 5
        assert ran >= 400 and h.x[6] in (step * (ran // 2), step * (ran // 2 + 1)), (asid, ran, h.x[6])
    assert (1, va + 0xFFE, p1 >> 12) in eng.blocks


def test_a_failed_chain_puts_back_the_jump_and_fetch_entries() -> None:
    """Two native blocks on two pages jump to each other (chained).  When the jump-table
    entry of one and its page's native fetch-table entry are gone (as when another block
    whose physical address hashes to the same set, or another address space's page, takes
    their slots), the next chain there fails once and returns to Python, which puts both back."""
    bus = Bus(BASE, 1 << 20)
    a, b = BASE, BASE + 0x1000
    bus.write(a, 4, addi(5, 5, 1))
    bus.write(a + 4, 4, _jal(b - (a + 4)))
    bus.write(b, 4, addi(6, 6, 1))
    bus.write(b + 4, 4, _jal(a - (b + 4)))
    eng = Engine(bus, "native")
    hart = Hart(0, bus, Clock(), native_regs=True)
    eng.add_hart(hart)
    hart.pc = a
    eng.run(hart, 1000)
    assert eng.jumps is not None
    jv = eng.jumps.views[3]
    s = eng.jumps.set_of(b)
    assert b in (jv[s], jv[s + 4])
    xslot = 4 * native.TLB_ENTRIES + 2 * ((b >> 12) & (native.TLB_ENTRIES - 1))
    xv = hart._ntlb_views[3]
    assert xv[xslot] == b >> 12
    eng.jumps.remove(3, b)                    # (M-mode: the physical address is the pc)
    xv[xslot] = (1 << 64) - 1
    x5, x6 = hart.x[5], hart.x[6]
    eng.run(hart, 1000)
    assert b in (jv[s], jv[s + 4]) and xv[xslot] == b >> 12 and xv[xslot + 1] == b >> 12
    assert hart.x[5] - x5 > 100 and abs((hart.x[5] - x5) - (hart.x[6] - x6)) <= 1


def _anonymous() -> int:
    text = Path("/proc/self/smaps_rollup").read_text()
    return sum(int(line.split()[1]) << 10 for line in text.splitlines() if line.startswith("Anonymous:"))


def test_a_loaded_file_is_shared_page_cache_not_private_memory(tmp_path: Path) -> None:
    """Every VM booting one kernel loads its cache file: it must not cost each of them the
    file's size in private memory (four clones of a 256 MiB VM came to 666 MiB when it did)."""
    page = bytes(range(256)) * 16
    w = CodeCache(tmp_path, max_file=64 << 20)
    for i in range(6000):                          # ~24 MiB of entries
        w.store(3, BASE + 4 * i, ((0, 16),), page, bytes([i & 0xFF]) * 4000, [], 1)
    assert w.save()
    size = next(tmp_path.glob("native-*.bin")).stat().st_size
    assert size > 20 << 20
    before = _anonymous()
    r = CodeCache(tmp_path, max_file=64 << 20)
    grown = _anonymous() - before
    assert r.stats["loaded"] == 6000
    assert grown < 4 << 20, (grown, size)
    hit = r.lookup(3, BASE + 4 * 5999, page)       # entries are still read from the file
    assert hit is not None and hit[2] == 1           # (one made with the same bytes at that page offset)
    assert hit[0] in {bytes([i & 0xFF]) * 4000 for i in range(5999 % 1024, 6000, 1024)}


CODE_PAGE = BASE + 0x20_0000


def paged(*vas: int) -> tuple[Bus, Engine, Hart]:
    """S-mode under Sv39 with CODE_PAGE (pc_program) mapped at each of `vas`."""
    ram, root = BASE, BASE + 0x10_0000
    code_page = CODE_PAGE
    bus = Bus(ram, 4 << 20)
    l1, l0 = root + 0x1000, root + 0x2000
    bus.write(root + 8 * 1, 8, ((l1 >> 12) << 10) | 1)
    bus.write(l1, 8, ((l0 >> 12) << 10) | 1)
    for va in vas:
        bus.write(l0 + 8 * ((va >> 12) & 0x1FF), 8, ((code_page >> 12) << 10) | 0xCF)   # V R W X A D
    for i, w in enumerate(pc_program()):
        bus.write(code_page + 4 * i, 4, w)
    eng = Engine(bus, "native")
    h = Hart(0, bus, Clock(), native_regs=True)
    eng.add_hart(h)
    h.set_priv(1)
    h.write_satp((8 << 60) | (root >> 12))
    return bus, eng, h


def test_one_translation_serves_a_page_at_every_virtual_address() -> None:
    """A physical page of code mapped at two virtual addresses (a library in two
    processes, at randomised addresses) is translated once: the second address runs the
    first one's machine code, with its own pc values (auipc, links), and goes through
    Python for its first block only -- the rest chain natively by physical address to
    the code made at the first address; a store into the page drops the block at both
    addresses."""
    va1, va2 = 0x4000_1000, 0x4000_5000
    bus, eng, h = paged(va1, va2)
    assert eng.native is not None
    h.pc = va1
    eng.run(h, 2000)
    _pc_results(h, va1)
    made = eng.native.stats["native_blocks"]
    assert made >= 3 and len(eng.shared) == made
    assert len([pc for _, pc, _ in eng.block_keys() if pc >> 12 == va1 >> 12]) >= 3
    assert eng.stats["links"] >= 1                          # (the loop's exit back into the page)
    h.x[13] = 0
    h.pc = va2
    eng.run(h, 2000)
    _pc_results(h, va2)
    assert eng.native.stats["native_blocks"] == made        # nothing translated or placed again
    assert {pc >> 12 for _, pc, _ in eng.block_keys()} == {va1 >> 12, va2 >> 12}
    assert [pc for _, pc, _ in eng.block_keys() if pc >> 12 == va2 >> 12] == [va2]
    bus.write(CODE_PAGE, 4, addi(13, 0, 1))                 # a store into the page: both go
    assert not eng.shared and not eng.block_keys()
    h.pc = va2
    eng.run(h, 2000)
    _pc_results(h, va2)
    assert eng.native.stats["native_blocks"] > made


def test_too_many_addresses_are_forgotten_but_the_code_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """At MAX_BLOCKS the engine forgets every block's address, not its code: the page at
    new addresses runs the code placed before, and a store into the page still drops it."""
    vas = [0x4000_1000 + 0x1000 * i for i in range(8)]
    bus, eng, h = paged(*vas)
    assert eng.native is not None
    monkeypatch.setattr(engine_mod, "MAX_BLOCKS", 4)
    for va in vas:
        h.x[13] = 0
        h.pc = va
        eng.run(h, 2000)
        _pc_results(h, va)
    made = eng.native.stats["native_blocks"]
    assert eng.stats["forgets"] >= 2 and eng.stats["flushes"] == 0 and made == len(eng.shared)
    bus.write(CODE_PAGE + 4, 4, 0x2 << 12 | 10 << 7 | 0x17)    # auipc x10, 0x2: the page is still watched
    h.x[13] = 0
    h.pc = vas[0]
    eng.run(h, 2000)
    assert h.x[10] == vas[0] + 0x2004 and eng.native.stats["native_blocks"] > made
