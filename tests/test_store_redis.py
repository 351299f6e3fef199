"""The Redis tier against a real redis-server: several processes share it, bad values are misses, a dead server is misses.

Uses ``$COMPRESSOR_PLUGIN_TEST_REDIS`` (a ``redis://`` URL, set by .ci/run) when present;
otherwise starts its own ``redis-server`` on a free loopback port; skips if neither exists.
The test that kills the server always starts its own.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch

redis = pytest.importorskip("redis", reason="the redis package is not installed (pip install '.[redis]')")

from compressor_plugin.context import CompressedContext  # noqa: E402
from compressor_plugin.store import ContextStore, context_key, encode_context  # noqa: E402
from compressor_plugin.store_redis import RedisTier  # noqa: E402

N_KEYS = 6


def make(i: int) -> tuple[str, str, CompressedContext]:
    """Deterministic (text, key, context) number ``i`` (~65 KB: a value file locally)."""
    gen = torch.Generator().manual_seed(500 + i)
    shape = (4, 2, 16, 64)
    ctx = CompressedContext("kv", 40 + i, "base-fp", "comp-fp", keys=torch.randn(shape, generator=gen),
                            values=torch.randn(shape, generator=gen))
    text = f"a chunk shared between machines, number {i}"
    return text, context_key(text, base_fingerprint="base-fp", compressor_fingerprint="comp-fp", k=16, mode="kv",
                             dtype=torch.float32), ctx


def fingerprint(ctx: CompressedContext) -> str:
    """Exact identity of a context: every header field and every tensor bit."""
    h = hashlib.sha256()
    h.update(repr((ctx.mode, ctx.source_tokens, ctx.base_fingerprint, ctx.compressor_fingerprint, ctx.dtype,
                   tuple(ctx.keys.shape))).encode())
    h.update(ctx.keys.contiguous().view(torch.uint8).numpy().tobytes())
    h.update(ctx.values.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throw-away redis-server on a loopback port (no persistence)."""

    def __init__(self, tmp: Path):
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not on PATH and COMPRESSOR_PLUGIN_TEST_REDIS is not set")
        self.port = _free_port()
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(tmp)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            self.kill()
            pytest.fail("redis-server did not start")
        client.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> str:
    url = os.environ.get("COMPRESSOR_PLUGIN_TEST_REDIS")
    if url:
        yield url
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.kill()


@pytest.fixture()
def prefix() -> str:
    """A key prefix of this test alone, so tests sharing one server do not see each other."""
    return f"test-{uuid.uuid4().hex}:"


# ---------------------------------------------------------------------------------- several processes
def _writer(directory: str, url: str, prefix: str, done: "mp.Event") -> None:
    with ContextStore(directory, remote=RedisTier(url, prefix=prefix)) as store:
        store.put_many([(key, ctx, text) for text, key, ctx in (make(i) for i in range(N_KEYS))])
    done.set()


def _reader(directory: str, url: str, prefix: str, done: "mp.Event", out: "mp.Queue") -> None:
    try:
        assert done.wait(timeout=120), "the writer did not finish"
        with ContextStore(directory, remote=RedisTier(url, prefix=prefix)) as store:
            got = {}
            for i in range(N_KEYS):
                text, key, _ = make(i)
                assert key not in store  # nothing local yet
                ctx = store.get(key)
                got[key] = (fingerprint(ctx) if ctx is not None else None, store.get_text(key),
                            key in store)  # the remote hit was written into the local folder
            remote_hits = store.stats()["hits"]
        with ContextStore(directory) as local_only:  # now served without Redis
            local = {key: fingerprint(local_only.get(key)) for key in got}
        out.put((os.getpid(), got, local, remote_hits, None))
    except BaseException as exc:  # reported to the parent
        out.put((os.getpid(), {}, {}, 0, f"{type(exc).__name__}: {exc}"))


def test_processes_with_their_own_folders_share_one_redis(tmp_path, redis_url, prefix):
    ctx = mp.get_context("spawn")
    done, out = ctx.Event(), ctx.Queue()
    readers = [ctx.Process(target=_reader, args=(str(tmp_path / f"reader{n}"), redis_url, prefix, done, out))
               for n in range(3)]
    for p in readers:
        p.start()
    writer = ctx.Process(target=_writer, args=(str(tmp_path / "writer"), redis_url, prefix, done))
    writer.start()
    writer.join(timeout=180)
    assert writer.exitcode == 0
    results = [out.get(timeout=180) for _ in readers]
    for p in readers:
        p.join(timeout=60)
    expected = {key: (fingerprint(c), text, True) for text, key, c in (make(i) for i in range(N_KEYS))}
    for pid, got, local, remote_hits, error in results:
        assert error is None, f"reader {pid}: {error}"
        assert got == expected  # bit-identical contexts, the same texts, now stored locally
        assert local == {key: fp for key, (fp, _, _) in expected.items()}
        assert remote_hits == N_KEYS


def test_store_with_a_remote_tier_pickles_with_it(tmp_path, redis_url, prefix):
    text, key, c = make(0)
    with ContextStore(tmp_path / "a", remote=RedisTier(redis_url, prefix=prefix)) as store:
        store.put(key, c, text)
        clone = pickle.loads(pickle.dumps(store))
    assert clone.remote.prefix == prefix
    shutil.rmtree(tmp_path / "a")
    clone2 = ContextStore(tmp_path / "b", remote=clone.remote)
    assert fingerprint(clone2.get(key)) == fingerprint(c)


# ---------------------------------------------------------------------------------- untrusted remote values
@pytest.mark.parametrize("plant", ["garbage", "other_key", "pickle", "flipped", "wrong_type", "huge", "bad_text"])
def test_bad_remote_values_are_misses_and_never_copied(tmp_path, redis_url, prefix, plant, caplog):
    client = redis.Redis.from_url(redis_url)
    text, key, c = make(1)
    other_text, other_key, other = make(2)
    name = prefix + "ctx:" + key
    if plant == "garbage":
        client.set(name, b"\x00" * 500)
    elif plant == "other_key":
        client.set(name, encode_context(other_key, other))  # valid, but for another key
    elif plant == "pickle":
        client.set(name, pickle.dumps({"a": 1}))
    elif plant == "flipped":
        data = bytearray(encode_context(key, c))
        data[-10] ^= 0x01
        client.set(name, bytes(data))
    elif plant == "wrong_type":
        client.rpush(name, b"a list, not a string")
    elif plant == "huge":
        client.set(name, b"\x00" * 5000)
    else:
        client.set(name, encode_context(key, c))
        client.set(prefix + "text:" + key, b"cpt1" + b"\x00" * 32 + text.encode())  # checksum does not match
    tier = RedisTier(redis_url, prefix=prefix, max_value_size=4000 if plant == "huge" else 2**28)
    with ContextStore(tmp_path / "s", remote=tier) as store:
        with caplog.at_level(logging.WARNING):
            if plant == "bad_text":
                assert store.get_text(key) is None
                assert fingerprint(store.get(key)) == fingerprint(c)  # the good context is still served
            else:
                assert store.get(key) is None
        assert ("text:" + key) not in store._text if plant == "bad_text" else key not in store
        assert "ignoring" in caplog.text
    client.close()


def test_the_tier_stores_bytes_only(redis_url, prefix):
    tier = RedisTier(redis_url, prefix=prefix)
    with pytest.raises(TypeError, match="bytes only"):
        tier.set_many([("bytes:x", {"not": "bytes"})])  # type: ignore[list-item]


# ---------------------------------------------------------------------------------- server failures
def test_killed_server_means_misses_and_recompute_never_errors(tmp_path, caplog):
    from compressor_plugin.compressor import Compressor, CompressorConfig
    from compressor_plugin.models import tiny_random_llama

    server = RedisServer(tmp_path)
    try:
        comp = Compressor(tiny_random_llama(0), CompressorConfig(k=4))
        chunks = ["Paris is the capital of France.", "The Nile flows north.", "Water boils at 100 C."]
        with ContextStore(tmp_path / "a", remote=server.url) as a:
            first = a.get_or_compress(chunks[:2], comp)
        with ContextStore(tmp_path / "b", remote=server.url) as b:
            assert all(r.hit for r in b.get_or_compress(chunks[:2], comp))  # from Redis
            server.kill()
            with caplog.at_level(logging.WARNING, logger="compressor_plugin.store"):
                t0 = time.monotonic()
                with ContextStore(tmp_path / "c", remote=server.url) as c:
                    assert c.get(first[0].key) is None and c.get_text(first[0].key) is None  # misses
                    results = c.get_or_compress(chunks, comp)  # recomputed, stored locally, no exception
                    assert [r.hit for r in results] == [False, False, False]
                    assert all(c.get(r.key) is not None for r in results)
                    assert c.delete(results[0].key)
                assert b.get(first[1].key) is not None  # still a local hit
                assert time.monotonic() - t0 < 30
            warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(warnings) == 1  # once, not per call
            assert "127.0.0.1" in warnings[0].getMessage()
    finally:
        server.kill()


def test_unreachable_server_from_the_start(tmp_path, caplog):
    text, key, c = make(3)
    port = _free_port()  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="compressor_plugin.store"):
        with ContextStore(tmp_path / "s", remote=f"redis://127.0.0.1:{port}/0") as store:
            assert store.get(key) is None
            store.put(key, c, text)
            assert fingerprint(store.get(key)) == fingerprint(c)
    assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1


def test_password_is_not_printed():
    tier = RedisTier("redis://:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in repr(tier) and "127.0.0.1:1" in repr(tier)


def test_ttl_expires_remote_entries(tmp_path, redis_url, prefix):
    text, key, c = make(4)
    with ContextStore(tmp_path / "a", remote=RedisTier(redis_url, prefix=prefix, ttl=0.3)) as a:
        a.put(key, c, text)
    with ContextStore(tmp_path / "b", remote=RedisTier(redis_url, prefix=prefix)) as b:
        time.sleep(0.6)
        assert b.get(key) is None


def test_cache_build_takes_a_remote_url():
    from compressor_plugin.cli import build_parser

    args = build_parser().parse_args(["cache", "build", "--input", "docs.jsonl", "--remote", "redis://h:6379/0"])
    assert args.remote == "redis://h:6379/0"
