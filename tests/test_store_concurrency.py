"""Several processes and threads on one store folder, and a writer killed mid-write."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from compressor_plugin.context import CompressedContext
from compressor_plugin.store import ContextStore, context_key

N_KEYS = 12


def expected_context(i: int, *, layers: int = 8, k: int = 16) -> tuple[str, str, CompressedContext]:
    """Deterministic (text, key, context) number ``i``; ~130 KB, so the value lives in a file."""
    gen = torch.Generator().manual_seed(1000 + i)
    shape = (layers, 2, k, 64)
    ctx = CompressedContext("kv", 100 + i, "base-fp", "comp-fp",
                            keys=torch.randn(shape, generator=gen), values=torch.randn(shape, generator=gen))
    text = f"shared chunk number {i}"
    key = context_key(text, base_fingerprint="base-fp", compressor_fingerprint="comp-fp", k=k, mode="kv",
                      dtype=torch.float32)
    return text, key, ctx


def same(a: CompressedContext, b: CompressedContext) -> bool:
    return (a.source_tokens == b.source_tokens and torch.equal(a.keys, b.keys)
            and torch.equal(a.values, b.values))


def _hammer(directory: str, worker: int, rounds: int, out: "mp.Queue") -> None:
    """Read every shared key; write it when missing, and overwrite some on purpose."""
    errors: list[str] = []
    stats = {"reads": 0, "hits": 0, "writes": 0}
    items = [expected_context(i) for i in range(N_KEYS)]

    store = ContextStore(directory)  # one object per process, shared by its threads

    def run(thread: int) -> None:
        try:
            for r in range(rounds):
                order = list(range(N_KEYS))
                order = order[(worker + thread + r) % N_KEYS:] + order[:(worker + thread + r) % N_KEYS]
                for i in order:
                    text, key, ctx = items[i]
                    got = store.get(key)
                    stats["reads"] += 1
                    if got is None or (i + r + worker) % 5 == 0:
                        store.put(key, ctx, text)
                        stats["writes"] += 1
                    elif not same(got, ctx):
                        errors.append(f"worker {worker}/{thread}: wrong value for chunk {i}")
                    else:
                        stats["hits"] += 1
                    if store.get_text(key) not in (None, text):
                        errors.append(f"worker {worker}/{thread}: wrong text for chunk {i}")
        except Exception as exc:  # reported to the parent, which fails the test
            errors.append(f"worker {worker}/{thread}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    out.put((worker, errors, stats))


def test_processes_and_threads_share_one_store(tmp_path: Path):
    directory = str(tmp_path / "shared")
    ContextStore(directory).close()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(directory, w, 6, queue)) for w in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    errors = [e for _, errs, _ in results for e in errs]
    assert errors == []
    assert sum(s["writes"] for _, _, s in results) >= N_KEYS
    assert sum(s["hits"] for _, _, s in results) > 0
    with ContextStore(directory) as store:
        assert len(store) == N_KEYS
        for i in range(N_KEYS):
            text, key, expected = expected_context(i)
            got = store.get(key)
            assert got is not None and same(got, expected)
            assert store.get_text(key) == text
        report = store.verify()
        assert report["ok"] == N_KEYS and report["removed"] == 0 and report["texts_removed"] == 0


def _writer(directory: str, ready: "mp.Event") -> None:
    """Write large entries forever (until killed)."""
    store = ContextStore(directory)
    i = 0
    while True:
        text, key, ctx = expected_context(i % 40, layers=120)  # ~2 MB per value
        store.put(key, ctx, text)
        if i == 2:
            ready.set()
        i += 1


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.13])
def test_writer_killed_mid_write_leaves_no_corrupt_entry(tmp_path: Path, delay: float):
    directory = str(tmp_path / "killed")
    ctx = mp.get_context("spawn")
    for attempt in range(2):  # kill twice into the same folder
        ready = ctx.Event()
        proc = ctx.Process(target=_writer, args=(directory, ready))
        proc.start()
        assert ready.wait(timeout=120), "writer did not start"
        time.sleep(delay + 0.02 * attempt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL
    with ContextStore(directory) as store:
        keys = list(store.keys())
        assert len(keys) >= 3
        expected = {key: (text, c) for text, key, c in (expected_context(i, layers=120) for i in range(40))}
        for key in keys:
            got = store.get(key)
            assert got is not None, "an entry written before the kill was unreadable"
            assert same(got, expected[key][1])
        report = store.verify()
        assert report["removed"] == 0 and report["texts_removed"] == 0 and report["ok"] == len(keys)
        # Value files of the interrupted write (if any) were cleaned up; nothing is left unaccounted.
        assert store.verify()["files_fixed"] == 0


def _stalled_writer(directory: str, stage: str, ready: "mp.Event") -> None:
    """Write three entries, then stop forever at ``stage`` of a fourth write (to be killed there).

    ``file``: half of the new value file is on disk, no database row yet.
    ``transaction``: the row of an overwrite of entry 0 is written but not committed.
    """
    from compressor_plugin.store_backend import SafeCache

    store = ContextStore(directory)
    for i in range(3):
        text, key, c = expected_context(i, layers=120)
        store.put(key, c, text)
    if stage == "file":
        def stalled_write(self, data, folder=None):
            name = os.urandom(16).hex()
            path = Path(self.directory, name[:2], name[2:4], name[4:] + ".val")
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "xb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                ready.set()
                time.sleep(600)

        SafeCache._write_file = stalled_write
        text, key, c = expected_context(3, layers=120)
    else:
        real_cull = SafeCache._cull

        def stalled_cull(self, con, **kwargs):  # runs inside the write transaction, after the row is written
            files = real_cull(self, con, **kwargs)
            if str(self.directory).endswith("contexts"):
                ready.set()
                time.sleep(600)
            return files

        SafeCache._cull = stalled_cull
        text, key, _ = expected_context(0, layers=120)
        c = expected_context(5, layers=120)[2]  # a different value for entry 0
    store.put(key, c, text)


@pytest.mark.parametrize("stage", ["file", "transaction"])
def test_writer_killed_at_the_worst_moment(tmp_path: Path, stage: str):
    directory = str(tmp_path / f"stalled-{stage}")
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_stalled_writer, args=(directory, stage, ready))
    proc.start()
    assert ready.wait(timeout=120), "writer did not reach the stall point"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=30)
    stray = sorted((Path(directory) / "contexts").rglob("*.val"))
    assert len(stray) == 4  # three entries plus the interrupted file
    with ContextStore(directory, timeout=10) as store:
        assert len(store) == 3
        for i in range(3):
            text, key, expected = expected_context(i, layers=120)
            got = store.get(key)
            assert got is not None and same(got, expected)  # entry 0 keeps its old value
            assert store.get_text(key) == text
        assert store.get(expected_context(3, layers=120)[1]) is None
        report = store.verify()
        assert report["ok"] == 3 and report["removed"] == 0 and report["files_fixed"] >= 1
        assert len(sorted((Path(directory) / "contexts").rglob("*.val"))) == 3
