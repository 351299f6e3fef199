"""The store trusts nothing on disk: each test plants or breaks something, then checks the guarantee holds.

Threat: someone who can write the store folder (or a disk that fills up, or a read-only
volume). Guarantees: no file outside the folder is read or deleted, nothing is unpickled,
memory stays bounded, reads never hang or raise, a committed entry is never lost, bad entries
are misses, and exactly the bad entries are removed.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest
import torch

from compressor_plugin.context import CompressedContext
from compressor_plugin.errors import MissingChunkWarning
from compressor_plugin.store import (
    ContextStore,
    StoreReadOnlyError,
    StoreWriteError,
    ValueTooLargeError,
    context_key,
    decode_context,
    encode_text,
)
from compressor_plugin import store as store_mod
from compressor_plugin import store_backend


def make(i: int, *, layers: int = 4, k: int = 4, dtype: torch.dtype = torch.float32) -> tuple[str, str, CompressedContext]:
    """(text, key, context) number ``i``: about 16 KB in fp32."""
    gen = torch.Generator().manual_seed(i)
    shape = (layers, 2, k, 64)
    ctx = CompressedContext("kv", 50 + i, "base-fp", "comp-fp", keys=torch.randn(shape, generator=gen).to(dtype),
                            values=torch.randn(shape, generator=gen).to(dtype))
    text = f"chunk number {i}"
    return text, context_key(text, base_fingerprint="base-fp", compressor_fingerprint="comp-fp", k=k, mode="kv",
                             dtype=dtype), ctx


def same(a: CompressedContext, b: CompressedContext) -> bool:
    return (a.source_tokens == b.source_tokens and a.compressor_fingerprint == b.compressor_fingerprint
            and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values))


@pytest.fixture()
def fstore(tmp_path: Path):
    """Every value in its own file."""
    with ContextStore(tmp_path / "store", min_file_size=0) as s:
        yield s


def db(store: ContextStore, cache: str = "contexts") -> sqlite3.Connection:
    return sqlite3.connect(str(store.directory / cache / "cache.db"), isolation_level=None)


def plant_row(store: ContextStore, name: str, *, filename: str | None, size: int, mode: int = 2,
              value: bytes | None = None, access_time: float = 0.0, cache: str = "contexts") -> None:
    with db(store, cache) as con:
        con.execute("DELETE FROM Cache WHERE key = ?", (name,))
        con.execute("INSERT INTO Cache (key, raw, store_time, expire_time, access_time, access_count, tag, size, "
                    "mode, filename, value) VALUES (?, 1, 0, NULL, ?, 0, NULL, ?, ?, ?, ?)",
                    (name, access_time, size, mode, filename, value))


def value_files(store: ContextStore) -> set[Path]:
    return set((store.directory / "contexts").rglob("*.val")) | set((store.directory / "texts").rglob("*.val"))


# ---------------------------------------------------------------------------------- file paths
@pytest.mark.parametrize("filename", ["ABSOLUTE", "../../outside/secret.txt", "ab/../../../outside/secret.txt"])
def test_planted_path_outside_the_folder_is_never_read_or_deleted(fstore, tmp_path, filename, caplog):
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"private data")
    text, key, ctx = make(0)
    fstore.put(key, ctx, text)
    plant_row(fstore, "ctx:" + key, filename=str(secret) if filename == "ABSOLUTE" else filename, size=12)
    with caplog.at_level(logging.WARNING):
        assert fstore.get(key) is None  # a miss, not the file's content
        assert not fstore.delete(key)
    plant_row(fstore, "bytes:x", filename=str(secret) if filename == "ABSOLUTE" else filename, size=12)
    assert fstore.get_bytes("x") is None
    fstore.verify()
    fstore.clear()
    assert secret.read_bytes() == b"private data" and secret.parent.is_dir()


def test_symlinked_value_file_and_folder_are_not_followed(fstore, tmp_path):
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"private data")
    _, key, _ = make(0)
    # A value file that is a symlink to a file outside.
    name = "1" * 28 + ".val"
    (fstore.directory / "contexts" / "aa" / "bb").mkdir(parents=True)
    (fstore.directory / "contexts" / "aa" / "bb" / name).symlink_to(secret)
    plant_row(fstore, "ctx:" + key, filename=f"aa/bb/{name}", size=12)
    assert fstore.get(key) is None
    # A value sub-folder that is a symlink to a folder outside.
    (fstore.directory / "contexts" / "cc").symlink_to(secret.parent, target_is_directory=True)
    (secret.parent / "dd").mkdir()
    target = secret.parent / "dd" / name
    target.write_bytes(b"also private")
    plant_row(fstore, "bytes:y", filename=f"cc/dd/{name}", size=12)
    assert fstore.get_bytes("y") is None
    fstore.delete_bytes("y")
    fstore.verify()
    fstore.clear()
    assert secret.read_bytes() == b"private data" and target.read_bytes() == b"also private"


def test_eviction_of_a_planted_row_deletes_nothing_outside(tmp_path):
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"private data")
    with ContextStore(tmp_path / "small", size_limit=200_000, min_file_size=0) as store:
        # The oldest row, naming a file outside: the first one eviction picks.
        plant_row(store, "bytes:old", filename="../../outside/secret.txt", size=150_000, access_time=0.0)
        plant_row(store, "bytes:old2", filename=str(secret), size=150_000, access_time=0.0)
        for i in range(20):
            text, key, ctx = make(i)
            store.put(key, ctx, text)
        assert "bytes:old" not in store._kv and "bytes:old2" not in store._kv  # evicted
    assert secret.read_bytes() == b"private data"


# ---------------------------------------------------------------------------------- file kinds and sizes
def test_fifo_device_and_size_mismatch_are_refused_without_reading(fstore, tmp_path):
    _, key, _ = make(0)
    sub = fstore.directory / "contexts" / "aa" / "bb"
    sub.mkdir(parents=True)
    fifo = "2" * 28 + ".val"
    os.mkfifo(sub / fifo)
    plant_row(fstore, "ctx:" + key, filename=f"aa/bb/{fifo}", size=100)
    t0 = time.monotonic()
    assert fstore.get(key) is None  # would block forever if opened for a blocking read
    assert time.monotonic() - t0 < 5
    assert not (sub / fifo).exists()  # removed with its row (it was inside the folder)
    sub.mkdir(parents=True, exist_ok=True)
    zero = "3" * 28 + ".val"
    (sub / zero).symlink_to("/dev/zero")
    plant_row(fstore, "bytes:z", filename=f"aa/bb/{zero}", size=100)
    assert fstore.get_bytes("z") is None
    sub.mkdir(parents=True, exist_ok=True)
    device = "6" * 28 + ".val"
    try:  # the /dev/zero device itself, inside the folder (needs root)
        os.mknod(sub / device, 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    except PermissionError:
        pass
    else:
        plant_row(fstore, "bytes:d", filename=f"aa/bb/{device}", size=100)
        assert fstore.get_bytes("d") is None
    sub.mkdir(parents=True, exist_ok=True)
    small = "4" * 28 + ".val"
    (sub / small).write_bytes(b"x" * 1000)
    plant_row(fstore, "bytes:s", filename=f"aa/bb/{small}", size=10)  # the row lies about the size
    assert fstore.get_bytes("s") is None


def test_huge_sparse_file_is_refused_before_reading(fstore):
    import tracemalloc

    _, key, _ = make(0)
    sub = fstore.directory / "contexts" / "aa" / "bb"
    sub.mkdir(parents=True)
    big = "5" * 28 + ".val"
    with open(sub / big, "wb") as f:
        f.truncate(3 * 2**30)  # 3 GiB, sparse: takes no disk space
    for size in (3 * 2**30, 100):  # the row tells the truth, or lies
        plant_row(fstore, "ctx:" + key, filename=f"aa/bb/{big}", size=size)
        tracemalloc.start()
        assert fstore.get(key) is None
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 50 * 2**20


def test_oversized_value_inside_the_database_is_not_fetched(tmp_path):
    with ContextStore(tmp_path / "s", max_value_size=2**20) as store:
        plant_row(store, "bytes:big", filename=None, size=0, mode=1, value=b"\0" * (3 * 2**20))
        assert store.get_bytes("big") is None
        assert "bytes:big" not in store._kv  # removed as a bad entry


# ---------------------------------------------------------------------------------- settings
def test_planted_settings_rows_change_nothing(tmp_path):
    folder = tmp_path / "s"
    ContextStore(folder, size_limit=10 * 2**20, min_file_size=0).close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with sqlite3.connect(str(folder / "contexts" / "cache.db"), isolation_level=None) as con:
        for key, value in [("disk__directory", str(elsewhere)), ("disk_directory", str(elsewhere)),
                           ("disk_min_file_size", 2**30), ("size_limit", 1), ("eviction_policy", "none"),
                           ("sqlite_query_only", 1), ("sqlite_journal_mode", "off"), ("cull_limit", 0)]:
            con.execute("INSERT OR REPLACE INTO Settings VALUES (?, ?)", (key, value))
    with ContextStore(folder, size_limit=10 * 2**20, min_file_size=0) as store:
        keys = []
        for i in range(5):
            text, key, ctx = make(i)
            store.put(key, ctx, text)  # query_only would make this fail if the row were applied
            keys.append(key)
        assert all(store.get(k) is not None for k in keys)  # size_limit=1 would have evicted them
        assert store.size_limit == 10 * 2**20 and store._kv.eviction_policy == "least-recently-used"
        assert len(list((folder / "contexts").rglob("*.val"))) == 5  # min_file_size=0 from the code
    assert list(elsewhere.iterdir()) == []



@pytest.mark.parametrize("content", ["[" * 30_000, "[" * 30_000 + "]" * 30_000])
def test_deeply_nested_store_json_is_a_store_format_error(tmp_path, content):
    ContextStore(tmp_path / "s").close()
    (tmp_path / "s" / "store.json").write_text(content)
    with pytest.raises(store_mod.StoreFormatError, match="store.json is unreadable"):
        ContextStore(tmp_path / "s")
    assert (tmp_path / "s" / "store.json").read_text() == content  # refused, not rewritten

def test_saved_limits_out_of_range_are_ignored(tmp_path, caplog):
    ContextStore(tmp_path / "s").close()
    marker = tmp_path / "s" / "store.json"
    info = json.loads(marker.read_text())
    marker.write_text(json.dumps(dict(info, size_limit=-5, text_size_limit="huge")))
    with caplog.at_level(logging.WARNING), ContextStore(tmp_path / "s") as store:
        assert store.size_limit == store_mod.DEFAULT_SIZE_LIMIT
    assert "ignoring size_limit=-5" in caplog.text


# ---------------------------------------------------------------------------------- entry digest and ranges
def _rewrite_header(data: bytes, edit) -> bytes:
    """Change the safetensors metadata of stored bytes, keeping the tensor data (padding the header)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header["__metadata__"])
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob + data[8 + n:]


@pytest.mark.parametrize("field,value", [("source_tokens", "5000"), ("compressor_fingerprint", "other-comp"),
                                         ("base_fingerprint", "other-base"), ("extra", "EXTRA")])
def test_header_flips_are_caught_by_the_entry_digest(fstore, field, value, caplog):
    text, key, ctx = make(0)
    fstore.put(key, ctx, text)
    stored = fstore._kv.get("ctx:" + key)

    def edit(meta):
        if field == "extra":
            extra = json.loads(meta["extra"])
            extra["note"] = "planted"
            meta["extra"] = json.dumps(extra, sort_keys=True)
        else:
            meta[field] = value

    bad = _rewrite_header(stored, edit)
    CompressedContext.from_bytes(bad)  # the tensor digest alone does not notice
    fstore._kv.set("ctx:" + key, bad)
    with caplog.at_level(logging.WARNING):
        assert fstore.get(key) is None
    assert "entry digest mismatch" in caplog.text and key not in fstore


def _forged(key: str, ctx: CompressedContext) -> bytes:
    """Bytes with a *valid* entry digest for a context that skips the range checks (as an attacker can)."""
    extra = {"store_key": key}
    digest = CompressedContext._digest(ctx._tensors())
    extra["store_digest"] = store_mod._entry_digest(key, ctx, digest, extra)
    return dataclasses.replace(ctx, extra=extra).to_bytes()


@pytest.mark.parametrize("case", ["negative_tokens", "int8", "nan", "inf", "empty_fingerprint"])
def test_out_of_range_fields_are_refused_on_write_and_read(fstore, case, caplog):
    text, key, ctx = make(0)
    if case == "negative_tokens":
        bad = dataclasses.replace(ctx, source_tokens=-5)
    elif case == "int8":
        bad = dataclasses.replace(ctx, keys=ctx.keys.to(torch.int8), values=ctx.values.to(torch.int8))
    elif case == "empty_fingerprint":
        bad = dataclasses.replace(ctx, compressor_fingerprint="")
    else:
        keys = ctx.keys.clone()
        keys[1, 0, 2, 3] = float("nan") if case == "nan" else float("inf")
        bad = dataclasses.replace(ctx, keys=keys)
    with pytest.raises(ValueError):
        fstore.put(key, bad)
    fstore._kv.set("ctx:" + key, _forged(key, bad))
    with pytest.raises(ValueError):
        decode_context(_forged(key, bad), key)
    with caplog.at_level(logging.WARNING):
        assert fstore.get(key) is None
    assert key not in fstore


def test_zero_k_is_refused(fstore):
    text, key, ctx = make(0)
    empty = dataclasses.replace(ctx, keys=ctx.keys[:, :, :0], values=ctx.values[:, :, :0])
    with pytest.raises(ValueError, match="k is 0"):
        fstore.put(key, empty)
    fstore._kv.set("ctx:" + key, _forged(key, empty))
    assert fstore.get(key) is None


# ---------------------------------------------------------------------------------- texts
def test_flipped_digit_in_a_text_is_a_miss_and_verify_keeps_the_context(fstore, caplog):
    text = "The invoice total is 185,000 dollars."
    _, _, ctx = make(0)
    key = context_key(text, base_fingerprint="base-fp", compressor_fingerprint="comp-fp", k=4, mode="kv",
                      dtype=torch.float32)
    fstore.put(key, ctx, text)
    stored = fstore._text.get("text:" + key)
    fstore._text.set("text:" + key, stored.replace(b"185,000", b"$85,000"))
    with caplog.at_level(logging.WARNING):
        assert fstore.get_text(key) is None  # never the changed text
    fstore.put(key, ctx, text)
    fstore._text.set("text:" + key, stored.replace(b"185,000", b"$85,000"))
    report = fstore.verify()
    assert report["texts_removed"] == 1 and report["removed"] == 0 and report["ok"] == 1
    assert fstore.get(key) is not None and fstore.get_text(key) is None


def test_text_of_another_key_is_refused(fstore):
    (ta, ka, ca), (tb, kb, cb) = make(0), make(1)
    fstore.put(ka, ca, ta)
    fstore.put(kb, cb, tb)
    fstore._text.set("text:" + kb, fstore._text.get("text:" + ka))  # a valid text, moved
    assert fstore.get_text(kb) is None and fstore.get_text(ka) == ta


def test_intact_text_and_context_that_disagree_are_both_removed(fstore):
    (ta, ka, ca), (tb, kb, cb) = make(0), make(1)
    fstore.put(ka, ca, ta)
    fstore._text.set("text:" + ka, encode_text(ka, tb))  # checksummed, but not this chunk's text
    report = fstore.verify()
    assert report["removed"] == 1 and report["texts_removed"] == 1
    assert fstore.get(ka) is None and fstore.get_text(ka) is None


# ---------------------------------------------------------------------------------- overwrite
def test_overwrite_that_fails_before_commit_keeps_the_old_entry(fstore, monkeypatch):
    text, key, ctx = make(0)
    fstore.put(key, ctx, text)
    files_before = value_files(fstore)
    real = store_backend.SafeCache._cull

    def crash(self, con, **kwargs):  # inside the transaction, after the row was replaced
        real(self, con, **kwargs)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(store_backend.SafeCache, "_cull", crash)
    with pytest.raises(KeyboardInterrupt):
        fstore.put(key, make(5)[2], text)
    monkeypatch.undo()
    assert same(fstore.get(key), ctx)
    assert value_files(fstore) == files_before  # the new file is gone, the old one stays


# ---------------------------------------------------------------------------------- disk full
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_write_leaves_no_orphans_and_reads_keep_working(fstore, monkeypatch, caplog):
    stored = [make(i) for i in range(3)]
    fstore.put_many([(k, c, t) for t, k, c in stored])
    files_before = value_files(fstore)
    monkeypatch.setattr(store_backend.os, "write", _enospc)
    new = [make(i) for i in range(3, 6)]
    with pytest.raises(StoreWriteError, match="disk full"):
        fstore.put_many([(k, c, t) for t, k, c in new])
    assert value_files(fstore) == files_before
    assert all(fstore.get(k) is not None for _, k, _ in stored)
    assert all(fstore.get(k) is None for _, k, _ in new)


def test_full_database_keeps_hits_and_lets_verify_and_clear_recover(fstore, caplog):
    stored = [make(i) for i in range(3)]
    fstore.put_many([(k, c, t) for t, k, c in stored])
    files_before = value_files(fstore)
    for cache in (fstore._kv, fstore._text):  # SQLite may not grow any more: "database or disk is full"
        ((pages,),) = cache._con.execute("PRAGMA page_count").fetchall()
        cache._con.execute(f"PRAGMA max_page_count = {pages}")
    batch = []
    for i in range(300):  # 300 more rows do not fit in the pages the database has
        t, _, c = make(100 + i, layers=1)
        batch.append((context_key(t, base_fingerprint="base-fp", compressor_fingerprint="comp-fp", k=4, mode="kv",
                                  dtype=torch.float32), c, t))
    with pytest.raises(StoreWriteError, match="full"):
        fstore.put_many(batch)
    assert value_files(fstore) == files_before  # the batch's value files were removed
    with caplog.at_level(logging.WARNING):
        assert all(fstore.get(k) is not None for _, k, _ in stored)  # hits stay hits
        assert all(fstore.get_text(k) == t for t, k, _ in stored)
    report = fstore.verify()
    assert report["ok"] == 3 and report["removed"] == 0
    assert fstore.clear() >= 6
    assert value_files(fstore) == set()


def test_failed_access_update_does_not_turn_hits_into_misses(fstore, caplog):
    text, key, ctx = make(0)
    fstore.put(key, ctx, text)
    fstore._kv._con.execute("PRAGMA query_only = 1")  # every write on this connection now fails
    with caplog.at_level(logging.WARNING):
        assert fstore.get(key) is not None and fstore.get(key) is not None
    assert caplog.text.count("cannot record a read") == 1  # logged once, not per read


# ---------------------------------------------------------------------------------- read-only
def test_read_only_store_serves_hits_and_refuses_writes(tmp_path):
    folder = tmp_path / "ro"
    stored = [make(i) for i in range(3)]
    with ContextStore(folder, min_file_size=0) as store:
        store.put_many([(k, c, t) for t, k, c in stored])
    snapshot = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and "-wal" not in p.name
                and "-shm" not in p.name}
    with ContextStore(folder, read_only=True) as ro:
        assert ro.read_only
        assert all(same(ro.get(k), c) for _, k, c in stored) and ro.get_text(stored[0][1]) == stored[0][0]
        text, key, ctx = make(9)
        for write in (lambda: ro.put(key, ctx, text), lambda: ro.put_bytes("x", b"1"), lambda: ro.delete(key),
                      lambda: ro.clear()):
            with pytest.raises(StoreReadOnlyError, match="read-only"):
                write()
        report = ro.verify()
        assert report["ok"] == 3
        assert ro.stats()["read_only"] is True
    assert {p: p.read_bytes() for p in snapshot} == snapshot


def test_read_only_volume_is_detected(tmp_path, monkeypatch):
    folder = tmp_path / "vol"
    text, key, ctx = make(0)
    with ContextStore(folder) as store:
        store.put(key, ctx, text)
    monkeypatch.setattr(store_backend, "_folder_writable", lambda folder: False)
    with ContextStore(folder) as ro:
        assert ro.read_only and same(ro.get(key), ctx)
        with pytest.raises(StoreReadOnlyError):
            ro.put(key, ctx, text)


def test_cli_verify_on_a_read_only_store_does_not_advise_deleting_it(tmp_path, monkeypatch, capsys):
    from compressor_plugin.cli import main

    folder = tmp_path / "vol"
    text, key, ctx = make(0)
    with ContextStore(folder) as store:
        store.put(key, ctx, text)
    monkeypatch.setattr(store_backend, "_folder_writable", lambda folder: False)
    assert main(["cache", "verify", "--store", str(folder)]) == 0
    out = capsys.readouterr()
    assert "read-only" in out.out and "delete" not in (out.out + out.err).lower()


def test_cli_verify_on_a_full_disk_does_not_advise_deleting_it(tmp_path, monkeypatch, capsys):
    from compressor_plugin.cli import main

    folder = tmp_path / "full"
    text, key, ctx = make(0)
    with ContextStore(folder) as store:
        store.put(key, ctx, text)

    def full(self, *a, **k):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store_backend.SafeCache, "expire", full)
    assert main(["cache", "verify", "--store", str(folder)]) == 0
    out = capsys.readouterr()
    assert "full" in out.out and "delete" not in (out.out + out.err).lower()


# ---------------------------------------------------------------------------------- byte values
def test_byte_value_larger_than_the_limit_is_refused_without_evicting(tmp_path):
    from compressor_plugin.integrations.langchain_store import ContextByteStore

    with ContextStore(tmp_path / "s", size_limit=2 * 2**20) as store:
        stored = [make(i) for i in range(5)]
        store.put_many([(k, c, t) for t, k, c in stored])
        view = ContextByteStore(store)
        with pytest.raises(ValueTooLargeError, match="at most"):
            view.mset([("huge", b"\0" * (3 * 2**20))])
        assert all(store.get(k) is not None for _, k, _ in stored)
        assert view.mget(["huge"]) == [None]


def test_unwritable_database_file_opens_read_only(tmp_path, monkeypatch):
    folder = tmp_path / "theirs"
    text, key, ctx = make(0)
    with ContextStore(folder) as store:
        store.put(key, ctx, text)

    def refuse(self):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(store_backend.SafeCache, "_create_schema", refuse)
    with ContextStore(folder) as ro:
        assert ro.read_only and same(ro.get(key), ctx)
        with pytest.raises(StoreReadOnlyError, match=str(folder)):
            ro.put(key, ctx, text)


def test_planted_rows_with_odd_sizes_cannot_block_deletes_or_eviction(tmp_path):
    with ContextStore(tmp_path / "s", size_limit=300_000, min_file_size=0) as store:
        plant_row(store, "bytes:a", filename="aa/bb/" + "7" * 28 + ".val", size=None, access_time=0.0)
        plant_row(store, "bytes:b", filename="aa/bb/" + "8" * 28 + ".val", size="lots", access_time=0.0)
        for i in range(30):  # forces eviction of the planted rows
            text, key, ctx = make(i)
            store.put(key, ctx, text)
        assert "bytes:a" not in store._kv and "bytes:b" not in store._kv
        plant_row(store, "bytes:c", filename="aa/bb/" + "9" * 28 + ".val", size=None)
        assert store.delete_bytes("c")
        assert store.clear() > 0


def test_running_volume_total_matches_the_table(fstore):
    exact = store_backend._EXACT_FILE_BYTES
    for i in range(6):
        text, key, ctx = make(i)
        fstore.put(key, ctx, text)
    fstore.put(make(0)[1], make(7)[2], None)  # an overwrite
    fstore.delete(make(1)[1])
    fstore.put_bytes("x", b"1" * 100)
    fstore.delete_bytes("x")
    con = fstore._kv._con
    ((total,),) = con.execute("SELECT file_bytes FROM StoreVolume").fetchall()
    ((expected,),) = con.execute(exact).fetchall()
    assert total == expected > 0


@pytest.mark.parametrize("link", ["cache.db", "cache.db-wal", "folder"])
def test_symlinked_database_or_folder_is_refused(tmp_path, link):
    folder = tmp_path / "s"
    ContextStore(folder).close()
    victim = tmp_path / "outside.db"
    victim.write_bytes(b"someone else's file")
    contexts = folder / "contexts"
    if link == "folder":
        (tmp_path / "elsewhere").mkdir()
        for p in contexts.iterdir():
            p.unlink()
        contexts.rmdir()
        contexts.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    else:
        (contexts / link).unlink(missing_ok=True)
        (contexts / link).symlink_to(victim)
    with pytest.raises(store_mod.StoreFormatError, match="symlink"):
        ContextStore(folder)
    assert victim.read_bytes() == b"someone else's file"
    if link == "folder":
        assert list((tmp_path / "elsewhere").iterdir()) == []


def test_value_file_removed_meanwhile_is_a_plain_miss(fstore):
    text, key, ctx = make(0)
    fstore.put(key, ctx, text)
    [path] = (fstore.directory / "contexts").rglob("*.val")
    path.unlink()  # as an overwrite in another process would, between reading the row and the file
    assert fstore.get(key) is None
    assert key in fstore  # not reported as bad: the row may already name a newer file
    assert fstore.verify()["files_fixed"] == 1 and key not in fstore


def test_a_write_survives_its_own_eviction_when_the_limit_is_tiny(tmp_path):
    # The database pages alone are over this limit: older entries go, the one just written stays.
    with ContextStore(tmp_path / "tiny", size_limit=20_000, min_file_size=0) as store:
        for i in range(3):
            text, key, ctx = make(i)
            store.put(key, ctx, text)
            assert same(store.get(key), ctx)
        assert len(store) == 1


def test_write_retries_when_another_process_removes_the_new_folder(fstore, monkeypatch):
    real = store_backend.SafeCache._open_dir
    calls = []

    def racing(self, parts, create=False):
        fd = real(self, parts, create)
        if create and not calls:  # as another process's remove_file would: the emptied folders go
            calls.append(parts)
            os.rmdir(self.directory / parts[0] / parts[1])
            os.rmdir(self.directory / parts[0])
        return fd

    monkeypatch.setattr(store_backend.SafeCache, "_open_dir", racing)
    text, key, ctx = make(0)
    fstore.put(key, ctx, text)
    assert calls and same(fstore.get(key), ctx)


# ---------------------------------------------------------------------------------- planted schema objects
_SPIN = """
CREATE VIEW spin(n) AS WITH RECURSIVE s(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM s) SELECT n FROM s;
CREATE TRIGGER z_ins AFTER INSERT ON Cache BEGIN SELECT n FROM spin WHERE n < 0; END;
CREATE TRIGGER z_upd AFTER UPDATE ON Cache BEGIN SELECT n FROM spin WHERE n < 0; END;
CREATE TRIGGER z_del AFTER DELETE ON Cache BEGIN SELECT n FROM spin WHERE n < 0; END;
"""
# One of the store's own triggers, same name, with an endless body.
_SPIN_IN_OWN_TRIGGER = """
CREATE VIEW spin(n) AS WITH RECURSIVE s(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM s) SELECT n FROM s;
DROP TRIGGER StoreVolume_insert;
CREATE TRIGGER StoreVolume_insert AFTER INSERT ON Cache BEGIN SELECT n FROM spin WHERE n < 0; END;
"""


@pytest.mark.parametrize("planted", [_SPIN, _SPIN_IN_OWN_TRIGGER, "ANALYZE;"],
                         ids=["extra-objects", "replaced-trigger", "planner-statistics"])
def test_planted_views_and_triggers_are_refused_at_open(tmp_path, planted, capsys):
    from compressor_plugin.cli import main

    folder = tmp_path / "s"
    ContextStore(folder).close()
    with sqlite3.connect(str(folder / "contexts" / "cache.db")) as con:
        con.executescript(planted)  # no statement of the store runs before the refusal: nothing can spin
    with pytest.raises(store_mod.StoreFormatError, match="does not create"):
        ContextStore(folder)
    # `cache clear` refuses too, and says what to do instead.
    assert main(["cache", "clear", "--yes", "--store", str(folder)]) == 2
    assert "delete the store folder" in capsys.readouterr().err


def test_stores_touched_by_diskcache_still_open(tmp_path):
    diskcache = pytest.importorskip("diskcache")
    folder = tmp_path / "s"
    text, key, ctx = make(0)
    with ContextStore(folder) as store:
        store.put(key, ctx, text)
    for policy in ("least-recently-stored", "least-recently-used", "least-frequently-used"):
        with diskcache.Cache(str(folder / "contexts"), eviction_policy=policy, tag_index=True) as raw:
            raw.set("bytes:x", b"1")  # diskcache's own triggers and indexes are accepted
    with ContextStore(folder) as store:
        assert same(store.get(key), ctx) and store.get_bytes("x") == b"1"


def test_trigger_planted_after_open_cannot_hang_a_statement(tmp_path, monkeypatch, caplog):
    import threading

    monkeypatch.setattr(store_backend, "_MAX_STATEMENT_STEPS", 2_000_000)  # ~0.05 s of spinning
    with ContextStore(tmp_path / "s") as store:
        text, key, ctx = make(0)
        store.put(key, ctx, text)
        with sqlite3.connect(str(store.directory / "contexts" / "cache.db")) as con:
            con.executescript(_SPIN)  # planted while the store is open: its connection was checked before
        # A watchdog, so that a regression fails instead of hanging the test run.
        fired, con = [], store._kv._con  # this thread's connection (connections are per thread)
        watchdog = threading.Timer(60, lambda: (fired.append(1), con.interrupt()))
        watchdog.start()
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreWriteError, match="interrupted"):
                store.put(*make(1)[1:], None)
            with caplog.at_level(logging.WARNING):
                assert same(store.get(key), ctx)  # the access-time update is aborted; the hit is served
            assert "cannot record a read" in caplog.text
            with pytest.raises(sqlite3.OperationalError, match="interrupted"):
                store.clear()
            assert time.monotonic() - t0 < 30
        finally:
            watchdog.cancel()
        assert not fired
        store.close()  # the next connection checks the schema again
        with pytest.raises(store_mod.StoreFormatError, match="does not create"):
            store.get(key)


# ---------------------------------------------------------------------------------- text values
@pytest.mark.parametrize("mode", [1, 4], ids=["raw", "pickle"])
def test_text_value_is_size_checked_in_bytes_before_it_is_fetched(tmp_path, mode):
    import tracemalloc

    cap = 2**20
    with ContextStore(tmp_path / "s", max_value_size=cap) as store:
        # 256 Ki characters (within the cap if characters were counted) of 4 bytes each: 1 MiB of UTF-8,
        # 1 MiB more as a Python str.
        plant_row(store, "bytes:x", filename=None, size=0, mode=mode, value="\U0001F600" * (cap // 4))
        tracemalloc.start()
        try:
            result = store._kv.get("bytes:x", touch=False)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert isinstance(result, store_backend.RefusedValue)
        assert peak < cap // 4
        assert store.get_bytes("x") is None and "bytes:x" not in store._kv  # a bad entry, removed


# ---------------------------------------------------------------------------------- database swapped while open
@pytest.mark.parametrize("how", ["symlink", "other-file"])
@pytest.mark.parametrize("when", ["new-thread", "after-close"])
def test_database_swapped_after_open_is_refused_on_the_next_connection(tmp_path, how, when):
    import shutil
    import threading

    with ContextStore(tmp_path / "private") as private:
        private.put_bytes("mine", b"1")
    private_db = tmp_path / "private" / "contexts" / "cache.db"

    def private_rows():
        with sqlite3.connect(str(private_db)) as con:
            return con.execute("SELECT key FROM Cache ORDER BY key").fetchall()

    before = private_rows()
    shared = ContextStore(tmp_path / "shared")
    shared.put_bytes("x", b"1")
    if when == "after-close":
        shared.close()  # reopened on next use
    db = tmp_path / "shared" / "contexts" / "cache.db"
    db.unlink()
    if how == "symlink":
        db.symlink_to(private_db)
    else:  # a regular file, but not the database this store opened (here a copy of another store's)
        shutil.copyfile(private_db, tmp_path / "copy.db")
        os.replace(tmp_path / "copy.db", db)
    errors = []

    def put():
        try:
            shared.put_bytes("planted", b"2")
        except Exception as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    if when == "new-thread":
        thread = threading.Thread(target=put)
        thread.start()
        thread.join(30)
    else:
        put()
    assert len(errors) == 1 and isinstance(errors[0], store_mod.StoreFormatError)
    assert private_rows() == before


# ---------------------------------------------------------------------------------- merge
def test_merge_skips_planted_rows_with_malformed_keys(tmp_path):
    with ContextStore(tmp_path / "node1") as src:
        stored = [make(i) for i in range(3)]
        src.put_many([(k, c, t) for t, k, c in stored])
        for name in ("ctx:0000", "ctx:" + "G" * 64, "ctx:" + "A" * 64):
            plant_row(src, name, filename=None, size=1, mode=1, value=b"\0")
    with ContextStore(tmp_path / "target") as target:
        report = target.merge_from(tmp_path / "node1")
        assert report["copied"] == 3 and report["bad"] == 3
        assert all(same(target.get(k), c) for _, k, c in stored)



def test_merge_skips_a_context_whose_intact_text_gives_another_key(tmp_path):
    """What verify() removes is not copied either (before, the context was copied without its text,
    and the disagreement could no longer be seen in the target)."""
    (ta, ka, ca), (tb, kb, cb) = make(0), make(1)
    with ContextStore(tmp_path / "node1") as src:
        src.put(ka, ca, ta)
        src.put(kb, cb, tb)
        src._text.set("text:" + ka, encode_text(ka, tb))  # checksummed, but not this chunk's text
    with ContextStore(tmp_path / "target") as target:
        report = target.merge_from(tmp_path / "node1")
        assert report["copied"] == 1 and report["bad"] == 1
        assert ka not in target and same(target.get(kb), cb) and target.get_text(kb) == tb

# ---------------------------------------------------------------------------------- entries for another reader
@pytest.mark.parametrize("change", ["base", "k", "shape"])
def test_intact_entry_made_for_another_model_is_recomputed_not_served(tmp_path, tiny_compressor, change, caplog):
    """Someone who can write the folder plants a valid entry (its own digests are right) whose header
    names another base model, k or shape under a chunk's real key: it is removed and recomputed,
    not served as a hit that then fails every prompt holding it."""
    from compressor_plugin.engine import CompressionEngine
    from compressor_plugin.store import encode_context, entry_mismatch, expected_fields

    store = ContextStore(tmp_path / "store")
    text = "Tarvik Air flies to 39 cities from its hub at Dreskel Field Airport."
    [made] = store.get_or_compress([text], tiny_compressor)
    good = made.context.to("cpu")
    assert entry_mismatch(good, expected_fields(tiny_compressor)) is None
    if change == "base":
        planted = dataclasses.replace(good, base_fingerprint="0" * 16)
    elif change == "k":
        planted = dataclasses.replace(good, keys=good.keys[:, :, :1].clone(), values=good.values[:, :, :1].clone())
    else:
        planted = dataclasses.replace(good, keys=good.keys[:, :1].clone(), values=good.values[:, :1].clone())
    store._kv.set("ctx:" + made.key, encode_context(made.key, planted))  # passes every integrity check
    assert decode_context(store._kv.get("ctx:" + made.key), made.key) is not None
    with caplog.at_level(logging.WARNING):
        [again] = store.get_or_compress([text], tiny_compressor)
    assert not again.hit and "its reader expects" in caplog.text
    assert torch.equal(again.context.keys.cpu(), good.keys) and store.get(made.key) is not None  # healed
    # through an engine's marker: the planted entry is removed and the marker falls back to the text
    engine = CompressionEngine(tiny_compressor, store, anchors=0)
    marker = engine.mark([text])[0]
    store._kv.set("ctx:" + made.key, encode_context(made.key, planted))
    with pytest.warns(MissingChunkWarning):
        res = engine.resolve(f"Context: {marker}\nQuestion: Where is the hub?\nAnswer:")
    assert res.resolved == 0 and res.fallbacks == 1 and "ctx:" + made.key not in store._kv
    store.close()
