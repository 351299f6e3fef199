"""Tests of the on-disk store: keys, round trips, eviction, corruption, pickle refusal, CLI, LangChain view."""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import unicodedata
from pathlib import Path

import diskcache
import pytest
import torch

from compressor_plugin.compressor import Compressor, CompressorConfig, CompressorError
from compressor_plugin.context import CompressedContext
from compressor_plugin.models import tiny_random_llama
from compressor_plugin.store import (
    ContextStore,
    StoreFormatError,
    StoreResult,
    context_key,
    normalize_text,
)

TEXTS = [
    "Paris is the capital and most populous city of France.",
    "The mitochondrion is the powerhouse of the cell.",
    "Mount Everest is Earth's highest mountain above sea level.",
    "The Amazon river flows through Brazil, Peru and Colombia.",
]


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def comp() -> Compressor:
    return Compressor(tiny_random_llama(0), CompressorConfig(k=4))


@pytest.fixture(scope="module")
def comp_k2() -> Compressor:
    """Same base model weights (seed 0), another compressor (k=2)."""
    return Compressor(tiny_random_llama(0), CompressorConfig(k=2))


@pytest.fixture()
def store(tmp_path: Path) -> ContextStore:
    with ContextStore(tmp_path / "store") as s:
        yield s


@pytest.fixture()
def file_store(tmp_path: Path) -> ContextStore:
    """Every value in its own file, so tests can damage the files."""
    with ContextStore(tmp_path / "fstore", min_file_size=0) as s:
        yield s


class CallCounter:
    """Wraps a compressor's compress() and records the texts of each call (the real model still runs)."""

    def __init__(self, comp: Compressor, monkeypatch: pytest.MonkeyPatch):
        self.calls: list[list[str]] = []
        real = comp.compress

        def counted(texts, **kw):
            self.calls.append(list(texts))
            return real(texts, **kw)

        monkeypatch.setattr(comp, "compress", counted)

    @property
    def texts(self) -> list[str]:
        return [t for call in self.calls for t in call]


class PlantMarker:
    """Unpickling this creates a file: proof that someone called pickle.load on it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def value_files(store: ContextStore) -> list[Path]:
    return sorted((store.directory / "contexts").rglob("*.val"))


def assert_same(a: CompressedContext, b: CompressedContext) -> None:
    assert a.mode == b.mode and a.k == b.k and a.source_tokens == b.source_tokens
    assert a.base_fingerprint == b.base_fingerprint and a.compressor_fingerprint == b.compressor_fingerprint
    assert a.dtype == b.dtype
    assert torch.equal(a.keys.cpu(), b.keys.cpu()) and torch.equal(a.values.cpu(), b.values.cpu())


# ---------------------------------------------------------------------------------- keys
def test_normalize_text_is_nfc_and_strip():
    decomposed = "Cafe\u0301 au lait"
    assert normalize_text(f"  \n{decomposed}\t ") == unicodedata.normalize("NFC", decomposed)
    assert normalize_text("Caf\u00e9 au lait") == normalize_text(decomposed)
    with pytest.raises(TypeError):
        normalize_text(b"bytes")  # type: ignore[arg-type]


def test_context_key_is_stable_and_canonical():
    args = dict(base_fingerprint="base0", compressor_fingerprint="comp0", k=16, mode="kv")
    key = context_key("Paris is the capital of France.", dtype=torch.float32, **args)
    # Fixed value: a change here silently orphans every existing store entry.
    assert key == "b56f99ee2632ec4b6b5aa9215e0622d10fa19e323303d964bca0eb187aee8143"
    assert context_key("  Paris is the capital of France.\n", dtype="float32", **args) == key
    assert context_key("Paris is the capital of France.", dtype="torch.float", **args) == key
    assert context_key("Paris is the capital of France!", dtype=torch.float32, **args) != key
    with pytest.raises(ValueError):
        context_key("x", dtype="float99", **args)


def test_key_separation_by_model_compressor_k_mode_dtype(comp, comp_k2):
    base = dict(base_fingerprint="b", compressor_fingerprint="c", k=4, mode="kv", dtype=torch.float32)
    variants = [base, {**base, "base_fingerprint": "b2"}, {**base, "compressor_fingerprint": "c2"},
                {**base, "k": 16}, {**base, "mode": "embedding"}, {**base, "dtype": torch.bfloat16}]
    keys = {context_key(TEXTS[0], **v) for v in variants}
    assert len(keys) == len(variants)

    store = ContextStore.__new__(ContextStore)  # key_for needs no folder
    k4, k2 = ContextStore.key_for(store, TEXTS[0], comp), ContextStore.key_for(store, TEXTS[0], comp_k2)
    assert comp.base.fingerprint == comp_k2.base.fingerprint  # same base weights ...
    assert k4 != k2  # ... different compressor -> different key
    other_base = tiny_random_llama(1)
    assert other_base.fingerprint != comp.base.fingerprint
    assert context_key(TEXTS[0], base_fingerprint=other_base.fingerprint, compressor_fingerprint=comp.fingerprint,
                       k=4, mode="kv", dtype=torch.float32) != k4


def test_entries_of_one_compressor_are_misses_for_another(store, comp, comp_k2):
    [r4] = store.get_or_compress([TEXTS[0]], comp)
    assert store.get(r4.key) is not None
    assert store.get(store.key_for(TEXTS[0], comp_k2)) is None
    [r2] = store.get_or_compress([TEXTS[0]], comp_k2)
    assert not r2.hit and r2.context.k == 2
    assert store.get(r4.key).k == 4 and store.get(r2.key).k == 2


# ---------------------------------------------------------------------------------- round trip
def test_round_trip(store, comp):
    ctx = comp.compress([TEXTS[1]])[0]
    key = store.key_for(TEXTS[1], comp)
    assert key not in store and store.get(key) is None
    store.put(key, ctx, "  " + TEXTS[1] + "\n")
    assert key in store and len(store) == 1 and list(store.keys()) == [key]
    got = store.get(key)
    assert_same(got, ctx)
    assert got.extra == ctx.extra  # the key recorded in the entry is not handed back
    assert store.get_text(key) == TEXTS[1]
    st = store.stats()
    assert st["entries"] == 1 and st["text_entries"] == 1 and st["hits"] == 1 and st["misses"] == 1
    assert st["size_limit"] == 4 * 2**30 and st["directory"] == str(store.directory) and st["bytes"] > 0
    assert store.delete(key) and store.get(key) is None and store.get_text(key) is None


def test_put_checks_key_against_text_and_context(store, comp):
    ctx = comp.compress([TEXTS[0]])[0]
    with pytest.raises(ValueError, match="does not match"):
        store.put(store.key_for(TEXTS[1], comp), ctx, TEXTS[0])
    with pytest.raises(ValueError, match="does not match"):  # stored in another dtype than the key says
        store.put(store.key_for(TEXTS[0], comp), ctx.to(dtype=torch.bfloat16), TEXTS[0])
    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.put("not-a-key", ctx)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.get("ABC")
    with pytest.raises(TypeError):
        store.put("0" * 64, b"bytes")  # type: ignore[arg-type]


def test_embedding_mode_and_bf16_round_trip(store):
    ctx = CompressedContext("embedding", 9, "b", "c", embeddings=torch.randn(3, 8).to(torch.bfloat16))
    key = context_key("some text", base_fingerprint="b", compressor_fingerprint="c", k=3, mode="embedding",
                      dtype=torch.bfloat16)
    store.put(key, ctx, "some text")
    got = store.get(key)
    assert got.mode == "embedding" and got.dtype == torch.bfloat16 and torch.equal(got.embeddings, ctx.embeddings)


def test_get_or_compress_compresses_only_misses(store, comp, monkeypatch):
    counter = CallCounter(comp, monkeypatch)
    nfd = unicodedata.normalize("NFD", "Café society met in Zürich.")
    texts = [TEXTS[0], TEXTS[1], "  " + TEXTS[0] + " ", nfd, "Café society met in Zürich."]
    res = store.get_or_compress(texts, comp, batch_size=2)
    assert all(isinstance(r, StoreResult) for r in res) and [r.hit for r in res] == [False] * 5
    assert sorted(counter.texts) == sorted([TEXTS[0], TEXTS[1], unicodedata.normalize("NFC", nfd)])
    assert all(len(call) <= 2 for call in counter.calls)
    assert res[0].key == res[2].key and res[3].key == res[4].key and len({r.key for r in res}) == 3
    # Results come back in input order and equal what the compressor makes for that text.
    direct = comp.compress([TEXTS[1]])[0]
    assert_same(res[1].context, direct)

    counter.calls.clear()
    res2 = store.get_or_compress([TEXTS[2], TEXTS[1], TEXTS[0], TEXTS[2]], comp)
    assert counter.texts == [TEXTS[2]]
    assert [r.hit for r in res2] == [False, True, True, False]
    assert_same(res2[1].context, res[1].context)
    assert store.get_text(res2[0].key) == TEXTS[2]

    counter.calls.clear()
    res3 = store.get_or_compress(TEXTS[:3], comp)
    assert counter.calls == [] and all(r.hit for r in res3)


def test_hits_are_read_with_one_query_and_one_access_update(file_store, comp, caplog):
    """get_or_compress reads all its hits with one SELECT and records their use with one UPDATE;
    get_many verifies each entry as get does (a bad one is removed and is a miss)."""
    res = file_store.get_or_compress(TEXTS, comp)
    keys = [r.key for r in res]
    statements: list[str] = []
    file_store._kv._con.set_trace_callback(statements.append)
    try:
        again = file_store.get_or_compress(TEXTS + TEXTS[:1], comp)
    finally:
        file_store._kv._con.set_trace_callback(None)
    assert all(r.hit for r in again)
    assert [s.split()[0] for s in statements if "Cache" in s] == ["SELECT", "UPDATE"]
    for a, b in zip(again, res):
        assert_same(a.context, b.context)
    rows = dict(file_store._kv._con.execute("SELECT key, access_count FROM Cache").fetchall())
    assert all(rows["ctx:" + key] == 1 for key in keys)  # each read once, the duplicate text included
    # one damaged entry among good ones and a missing key
    path = file_store._kv.directory / file_store._kv._con.execute(
        "SELECT filename FROM Cache WHERE key = ?", ("ctx:" + keys[1],)).fetchone()[0]
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF
    path.write_bytes(bytes(data))
    absent = context_key("never stored", base_fingerprint="b", compressor_fingerprint="c", k=4, mode="kv",
                         dtype=torch.float32)
    got = file_store.get_many([keys[0], keys[1], absent, keys[2]])
    assert [c is None for c in got] == [False, True, True, False]
    assert_same(got[0], res[0].context)
    assert_same(got[3], res[2].context)
    assert any("removing bad store entry" in rec.getMessage() for rec in caplog.records)
    assert keys[1] not in file_store
    with pytest.raises(ValueError, match="64 lowercase hex"):
        file_store.get_many([keys[0], "not a key"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_check_of_every_float_dtype(dtype):
    from compressor_plugin.store import all_finite

    info = torch.finfo(dtype)
    fine = torch.tensor([0.0, -0.0, 1.5, -2.0, info.max, -info.max, info.tiny, info.smallest_normal / 4], dtype=dtype)
    assert all_finite(fine) and all_finite(fine.reshape(2, 4).t())  # any layout
    for bad in (float("nan"), float("inf"), float("-inf"), -float("nan")):
        t = fine.clone()
        t[3] = bad
        assert not all_finite(t)
    # the same answer as torch's own check, value by value, on random bit patterns (any exponent,
    # sign and payload) with every exponent bit set in one value of four
    ints = {16: torch.int16, 32: torch.int32, 64: torch.int64}[info.bits]
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(-2**15, 2**15, (2048, info.bits // 16), dtype=torch.int16, generator=gen).view(ints)
    raw[::4] |= torch.tensor([float("inf")], dtype=dtype).view(ints)  # +inf: every exponent bit, nothing else
    values = raw.view(dtype).reshape(-1)
    assert [all_finite(v.reshape(1)) for v in values] == torch.isfinite(values).tolist()


def test_get_or_compress_rejects_bad_input(store, comp):
    with pytest.raises(CompressorError, match="text 1 is empty"):
        store.get_or_compress(["fine", "   "], comp)
    with pytest.raises(CompressorError, match="not a single string"):
        store.get_or_compress("a string", comp)  # type: ignore[arg-type]
    long_text = "word " * 2000
    with pytest.raises(CompressorError, match="text 2 has"):
        store.get_or_compress([TEXTS[0], TEXTS[1], long_text], comp)


def test_aget_or_compress(store, comp):
    res = asyncio.run(store.aget_or_compress([TEXTS[3]], comp))
    assert len(res) == 1 and not res[0].hit
    assert asyncio.run(store.aget(res[0].key)) is not None


def test_store_pickles_as_its_folder(store, comp):
    [r] = store.get_or_compress([TEXTS[0]], comp)
    clone = pickle.loads(pickle.dumps(store))
    assert clone.directory == store.directory and clone.get(r.key) is not None
    clone.close()


# ---------------------------------------------------------------------------------- limits
def test_size_limit_evicts_least_recently_used(tmp_path):
    limit = 400_000
    with ContextStore(tmp_path / "small", size_limit=limit, min_file_size=0) as store:
        keys = []
        for i in range(40):
            ctx = CompressedContext("kv", 10, "b", "c", keys=torch.randn(2, 2, 4, 256), values=torch.randn(2, 2, 4, 256))
            key = context_key(f"chunk {i}", base_fingerprint="b", compressor_fingerprint="c", k=4, mode="kv",
                              dtype=torch.float32)
            store.put(key, ctx, f"chunk {i}")
            keys.append(key)
            assert store.get(keys[0]) is not None  # keep the first one recently used
        st = store.stats()
        assert st["size_limit"] == limit
        assert 2 <= st["entries"] < 40
        assert store._kv.volume() <= limit + 40_000  # one value over at most
        assert keys[0] in store and keys[-1] in store
        assert keys[1] not in store and keys[2] not in store
        assert store.get_text(keys[1]) == "chunk 1"  # texts outlive their contexts for fallback
    with ContextStore(tmp_path / "small", size_limit=None) as reopened:
        assert reopened.size_limit == limit  # None keeps the saved limit


def test_expire(tmp_path):
    import time

    with ContextStore(tmp_path / "exp", expire=0.2) as store:
        ctx = CompressedContext("embedding", 3, "b", "c", embeddings=torch.randn(1, 4))
        key = context_key("x", base_fingerprint="b", compressor_fingerprint="c", k=1, mode="embedding",
                          dtype=torch.float32)
        store.put(key, ctx, "x")
        assert store.get(key) is not None
        time.sleep(0.3)
        assert store.get(key) is None and store.get_text(key) is None
        assert store.verify()["expired"] == 2


def test_format_marker(tmp_path):
    ContextStore(tmp_path / "s").close()
    marker = tmp_path / "s" / "store.json"
    assert json.loads(marker.read_text())["format"] == "compressor_plugin.ContextStore"
    marker.write_text(json.dumps({"format": "compressor_plugin.ContextStore", "version": 999}))
    with pytest.raises(StoreFormatError, match="version"):
        ContextStore(tmp_path / "s")
    marker.write_text("{}")
    with pytest.raises(StoreFormatError, match="not a compressor-plugin store"):
        ContextStore(tmp_path / "s")


def test_damaged_database_gives_a_clear_error(tmp_path, capsys):
    from compressor_plugin.cli import main

    with ContextStore(tmp_path / "s") as store:
        for i in range(40):
            store.put_bytes(f"k{i}", bytes(2000))
    db = tmp_path / "s" / "contexts" / "cache.db"
    data = bytearray(db.read_bytes())
    data[8192:12288] = b"\xab" * 4096
    db.write_bytes(bytes(data))
    with pytest.raises(StoreFormatError, match="damaged"):
        ContextStore(tmp_path / "s")
    assert main(["cache", "stats", "--store", str(tmp_path / "s")]) == 2
    assert "damaged" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- corruption
def _stored(store: ContextStore, comp: Compressor, text: str) -> str:
    [r] = store.get_or_compress([text], comp)
    assert store.get(r.key) is not None
    return r.key


def _assert_recomputed(store, comp, text, key, monkeypatch, caplog):
    assert any("removing bad store entry" in rec.getMessage() for rec in caplog.records)
    assert key not in store  # the bad entry was deleted
    counter = CallCounter(comp, monkeypatch)
    [r] = store.get_or_compress([text], comp)
    assert not r.hit and counter.texts == [text]
    assert_same(store.get(r.key), comp.compress([text])[0])


def test_flipped_bytes_are_a_miss(file_store, comp, monkeypatch, caplog):
    key = _stored(file_store, comp, TEXTS[0])
    [path] = value_files(file_store)
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):  # inside the tensor data
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="compressor_plugin.store"):
        assert file_store.get(key) is None
    _assert_recomputed(file_store, comp, TEXTS[0], key, monkeypatch, caplog)


def test_truncated_file_is_a_miss(file_store, comp, monkeypatch, caplog):
    key = _stored(file_store, comp, TEXTS[1])
    [path] = value_files(file_store)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="compressor_plugin.store"):
        assert file_store.get(key) is None
    _assert_recomputed(file_store, comp, TEXTS[1], key, monkeypatch, caplog)


class DecodeCounter:
    """Counts the full checks (digest, parse, range checks) a store runs on entries it reads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        import compressor_plugin.store as store_module

        self.calls = 0
        real = store_module.decode_context

        def counted(data, key):
            self.calls += 1
            return real(data, key)

        monkeypatch.setattr(store_module, "decode_context", counted)


def test_memory_reuses_a_checked_context_only_for_the_same_bytes(file_store, comp, monkeypatch, caplog):
    key = _stored(file_store, comp, TEXTS[0])  # read once: checked and kept in memory
    decodes = DecodeCounter(monkeypatch)
    first, second = file_store.get(key), file_store.get(key)
    assert decodes.calls == 0
    assert_same(first, comp.compress([TEXTS[0]])[0]) and first is not second
    first.extra["changed"] = "by the caller"
    assert "changed" not in file_store.get(key).extra
    [path] = value_files(file_store)
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF  # inside the tensor data: the bytes differ from those checked before
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="compressor_plugin.store"):
        assert file_store.get(key) is None
    assert decodes.calls == 1 and any("digest mismatch" in r.getMessage() for r in caplog.records)


def test_memory_forgets_deleted_and_cleared_entries(store, comp):
    key = _stored(store, comp, TEXTS[1])
    assert store.delete(key) and store.get(key) is None
    key = _stored(store, comp, TEXTS[2])
    assert store.stats()["memory_entries"] == 1
    assert store.clear() > 0 and store.get(key) is None
    st = store.stats()
    assert st["memory_entries"] == st["memory_bytes"] == 0 and st["memory_limit"] == 256 * 2**20


def test_memory_limit(tmp_path, comp, monkeypatch):
    with pytest.raises(ValueError, match="memory_limit"):
        ContextStore(tmp_path / "bad", memory_limit=-1)
    with ContextStore(tmp_path / "off", memory_limit=0) as off:
        key = _stored(off, comp, TEXTS[0])
        decodes = DecodeCounter(monkeypatch)
        off.get(key)
        off.get(key)
        assert decodes.calls == 2 and off._memory.size == 0
    with ContextStore(tmp_path / "probe") as probe:
        _stored(probe, comp, TEXTS[0])
        one = probe._memory.size  # the stored bytes and the tensors of one context
    assert one > 0
    with ContextStore(tmp_path / "two", memory_limit=2 * one + one // 2) as two:  # room for two contexts
        keys = [_stored(two, comp, t) for t in TEXTS[:3]]
        assert list(two._memory._items) == keys[1:]  # the least recently used went first


def test_garbage_bytes_via_raw_api_are_a_miss(store, comp, monkeypatch, caplog):
    key = _stored(store, comp, TEXTS[2])
    with diskcache.Cache(str(store.directory / "contexts")) as raw:
        raw.set("ctx:" + key, b"\x00" * 100)
    with caplog.at_level(logging.WARNING, logger="compressor_plugin.store"):
        assert store.get(key) is None
    _assert_recomputed(store, comp, TEXTS[2], key, monkeypatch, caplog)


def test_entry_copied_to_another_key_is_a_miss(store, comp, caplog):
    key_a, key_b = _stored(store, comp, TEXTS[0]), _stored(store, comp, TEXTS[1])
    assert key_b in store._memory._items  # checked once: its context is kept in memory
    with diskcache.Cache(str(store.directory / "contexts")) as raw:
        raw.set("ctx:" + key_b, bytes(raw.get("ctx:" + key_a)))  # a valid context, under the wrong key
    with caplog.at_level(logging.WARNING, logger="compressor_plugin.store"):
        assert store.get(key_b) is None  # other bytes: checked in full, not served from memory
    assert "stored for key" in caplog.text and key_b not in store._memory._items
    assert store.get(key_a) is not None


def test_marker_payload_really_runs_code_when_unpickled(tmp_path):
    """Sanity check of the test payload itself: plain pickle.loads does create the file."""
    target = tmp_path / "proof"
    pickle.loads(pickle.dumps(PlantMarker(str(target))))
    assert target.exists()


@pytest.mark.parametrize("in_file", [False, True], ids=["inline", "file"])
def test_planted_pickle_is_never_loaded(tmp_path, comp, monkeypatch, caplog, in_file):
    marker = tmp_path / "PWNED"
    with ContextStore(tmp_path / "p", min_file_size=0 if in_file else 2**15) as store:
        key = _stored(store, comp, TEXTS[3])
        # A plain diskcache client (default Disk) pickles non-bytes values: plant one in each namespace.
        with diskcache.Cache(str(store.directory / "contexts"), disk_min_file_size=0 if in_file else 2**15) as raw:
            raw.set("ctx:" + key, PlantMarker(str(marker)))
            raw.set("bytes:lc", PlantMarker(str(marker)))
            raw.set(PlantMarker(str(marker)), b"pickled key")  # a key stored in pickle form
        with diskcache.Cache(str(store.directory / "texts")) as raw:
            raw.set("text:" + key, PlantMarker(str(marker)))
        assert (len(value_files(store)) > 0) == in_file
        with caplog.at_level(logging.WARNING, logger="compressor_plugin.store"):
            assert store.get(key) is None
            assert store.get_text(key) is None
            assert store.get_bytes("lc") is None
            assert list(store.keys()) == [] and list(store.byte_keys()) == []
            st = store.stats()
            assert st["entries"] == 0
        assert "pickle" in caplog.text
        _assert_recomputed(store, comp, TEXTS[3], key, monkeypatch, caplog)
        report = store.verify()
        assert report["foreign_left"] == 1 and report["removed"] == 0 and report["ok"] == 1
        store.clear()
        assert len(store._kv) == 0  # clear removes even the pickled-key row
    assert not marker.exists()


def test_verify_removes_bad_entries_and_keeps_good_ones(file_store, comp):
    res = file_store.get_or_compress(TEXTS, comp)
    keys = [r.key for r in res]
    # Damage one value file, and damage two texts (their contexts are good and must stay).
    victim = file_store._kv.get("ctx:" + keys[0])
    files = {p.read_bytes(): p for p in value_files(file_store)}
    files[victim].write_bytes(victim[:100])
    with diskcache.Cache(str(file_store.directory / "texts")) as raw:
        good = bytes(raw.get("text:" + keys[1]))
        raw.set("text:" + keys[1], good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit in the text
        raw.set("text:" + keys[2], b"\xff\xfe not utf-8")
    (file_store.directory / "contexts" / "ab" / "cd").mkdir(parents=True, exist_ok=True)
    stray = file_store.directory / "contexts" / "ab" / "cd" / ("0" * 28 + ".val")
    stray.write_bytes(b"left by a killed writer")
    report = file_store.verify()
    # The truncated file no longer matches its row's size: the file check drops that row, then
    # the file itself and the stray file (3 fixes).
    assert report["checked"] == 3 and report["removed"] == 0 and report["ok"] == 3
    assert report["texts_removed"] == 2 and report["files_fixed"] == 3
    assert not stray.exists()
    assert [file_store.get(k) is not None for k in keys] == [False, True, True, True]
    assert [file_store.get_text(k) for k in keys] == [TEXTS[0], None, None, TEXTS[3]]
    again = file_store.verify()
    assert again["removed"] == 0 and again["ok"] == 3 and again["texts_removed"] == 0


def test_verify_does_not_count_as_use(store, comp):
    store.get_or_compress(TEXTS, comp)
    con = store._kv._con
    before = con.execute("SELECT key, access_time FROM Cache ORDER BY key").fetchall()
    store.verify()
    assert con.execute("SELECT key, access_time FROM Cache ORDER BY key").fetchall() == before


def test_clear(store, comp):
    store.get_or_compress(TEXTS[:2], comp)
    store.put_bytes("x", b"1")
    assert store.clear() == 5
    assert store.stats()["entries"] == 0 and store.stats()["text_entries"] == 0 and store.get_bytes("x") is None


def test_merge_from_another_store(tmp_path, comp):
    with ContextStore(tmp_path / "node1") as a, ContextStore(tmp_path / "node2") as b:
        ra = a.get_or_compress(TEXTS[:2], comp)
        rb = b.get_or_compress(TEXTS[1:], comp)
        b.put_bytes("x", b"1")
        with diskcache.Cache(str(b.directory / "contexts")) as raw:  # one bad entry in the source
            raw.set("ctx:" + rb[-1].key, b"garbage")
        report = a.merge_from(tmp_path / "node2")
        assert report == {"copied": 1, "existing": 1, "bad": 1, "bytes_copied": 1}
        assert len(a) == 3 and a.get_bytes("x") == b"1"
        assert_same(a.get(rb[1].key), rb[1].context) and a.get_text(rb[1].key) == TEXTS[2]
        assert a.get(rb[-1].key) is None and a.get(ra[0].key) is not None
        with pytest.raises(ValueError, match="itself"):
            a.merge_from(a)


# ---------------------------------------------------------------------------------- CLI
def test_cli_stats_verify_clear(tmp_path, comp, capsys, monkeypatch):
    from compressor_plugin.cli import main

    path = tmp_path / "cli"
    with ContextStore(path) as store:
        store.get_or_compress(TEXTS[:3], comp)
    assert main(["cache", "stats", "--store", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["entries"] == 3 and data["size_limit"] == 4 * 2**30 and data["directory"] == str(path)
    assert main(["cache", "stats", "--store", str(path)]) == 0
    assert "entries: 3" in capsys.readouterr().out
    assert main(["cache", "verify", "--store", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] == 3
    monkeypatch.setattr("sys.stdin", open("/dev/null"))
    assert main(["cache", "clear", "--store", str(path)]) == 2
    assert "--yes" in capsys.readouterr().err
    assert main(["cache", "clear", "--store", str(path), "--yes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == 6
    assert main(["cache", "stats", "--store", str(tmp_path / "nothing")]) == 2
    assert "no compressor-plugin store" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_cli_cache_command_can_be_extended():
    import argparse

    from compressor_plugin.commands import cache as cache_cmd

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    # Another module registers first, then the cache module: both end up under one `cache`.
    cache_cmd.cache_subparsers(sub).add_parser("build").set_defaults(func="build")
    cache_cmd.register(sub)
    assert parser.parse_args(["cache", "build"]).func == "build"
    assert parser.parse_args(["cache", "stats"]).cache_command == "stats"


# ---------------------------------------------------------------------------------- byte namespace
def test_byte_namespace_is_separate(store, comp):
    [r] = store.get_or_compress([TEXTS[0]], comp)
    store.put_bytes("emb:1", b"\x00\x01")
    store.put_bytes("emb:2", bytearray(b"\x02"))
    assert store.get_bytes("emb:1") == b"\x00\x01" and store.get_bytes("emb:2") == b"\x02"
    assert list(store.keys()) == [r.key]
    assert sorted(store.byte_keys()) == ["emb:1", "emb:2"] and list(store.byte_keys("emb:2")) == ["emb:2"]
    assert store.stats()["entries"] == 1 and store.stats()["byte_entries"] == 2
    with pytest.raises(TypeError):
        store.put_bytes("x", "text")  # type: ignore[arg-type]
    assert store.delete_bytes("emb:1") and not store.delete_bytes("emb:1")


def test_context_byte_store_view(tmp_path):
    from compressor_plugin.integrations.langchain_store import ContextByteStore

    with ContextStore(tmp_path / "lc") as store:
        view = ContextByteStore(store)
        view.mset([("a", b"1"), ("b", b"2")])
        assert view.mget(["a", "b", "c"]) == [b"1", b"2", None]
        assert store.get_bytes("a") == b"1"
        with pytest.raises(TypeError):
            view.mset([("c", {"not": "bytes"})])  # type: ignore[list-item]
        with pytest.raises(TypeError):
            ContextByteStore(store, size_limit=1)
    reopened = ContextByteStore(tmp_path / "lc")  # a folder path opens its own ContextStore
    assert sorted(reopened.yield_keys()) == ["a", "b"]


# ---------------------------------------------------------------------------------- LangChain standard tests
try:
    from langchain_tests.integration_tests import BaseStoreAsyncTests, BaseStoreSyncTests
except ImportError:  # pragma: no cover - langchain-tests is in the `test` extra
    BaseStoreSyncTests = BaseStoreAsyncTests = None

if BaseStoreSyncTests is not None:
    from compressor_plugin.integrations.langchain_store import ContextByteStore

    class TestContextByteStoreSync(BaseStoreSyncTests[bytes]):
        @pytest.fixture
        def kv_store(self, tmp_path: Path) -> ContextByteStore:
            return ContextByteStore(tmp_path / "lc-sync")

        @pytest.fixture
        def three_values(self) -> tuple[bytes, bytes, bytes]:
            return b"foo", b"\x00bar\xff", b"buzz" * 20_000  # the last one goes to its own file

    @pytest.mark.asyncio
    @pytest.mark.filterwarnings("ignore:The test <Function test_no_overrides_DO_NOT_OVERRIDE>")
    class TestContextByteStoreAsync(BaseStoreAsyncTests[bytes]):
        @pytest.fixture
        def kv_store(self, tmp_path: Path) -> ContextByteStore:
            return ContextByteStore(tmp_path / "lc-async")

        @pytest.fixture
        def three_values(self) -> tuple[bytes, bytes, bytes]:
            return b"foo", b"\x00bar\xff", b"buzz" * 20_000


def test_reopening_keeps_the_saved_size_limit(tmp_path):
    from compressor_plugin.store import ContextStore

    with ContextStore(tmp_path / "s", size_limit=64 * 2**30) as s:
        assert s.size_limit == 64 * 2**30
    with ContextStore(tmp_path / "s") as s:
        assert s.size_limit == 64 * 2**30


def test_keys_are_listed_in_pages(tmp_path):
    with ContextStore(tmp_path / "many") as store:
        store._kv.set_many([(f"bytes:k{i:05d}", b"v") for i in range(2500)])
        assert list(store.byte_keys()) == [f"k{i:05d}" for i in range(2500)]
        assert store.stats()["byte_entries"] == 2500
