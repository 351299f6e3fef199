"""The bytes of stored entries (compressor_plugin.store_format) and the writer processes that
make them outside the calling process (compressor_plugin.caching.writers)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load, save

from compressor_plugin import store_format
from compressor_plugin.caching.writers import WriterPool
from compressor_plugin.context import CompressedContext
from compressor_plugin.store import ContextStore, context_key, encode_context


def make_ctx(seed: int = 0, dtype: torch.dtype = torch.bfloat16, anchors: bool = True) -> CompressedContext:
    g = torch.Generator().manual_seed(seed)
    shape = (3, 2, 4, 8)
    return CompressedContext("kv", 40 + seed, "base-fp", "comp-fp",
                             keys=torch.randn(shape, generator=g).to(dtype),
                             values=torch.randn(shape, generator=g).to(dtype), extra={"truncated": "true"},
                             anchor_ids=torch.arange(100 + seed, 110 + seed) if anchors else None)


def key_of(text: str, ctx: CompressedContext) -> str:
    return context_key(text, base_fingerprint=ctx.base_fingerprint, compressor_fingerprint=ctx.compressor_fingerprint,
                       k=ctx.k, mode=ctx.mode, dtype=ctx.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_serialised_contexts_are_the_same_bytes_every_time_and_safetensors_reads_them(dtype):
    ctx = make_ctx(dtype=dtype)
    data = ctx.to_bytes()
    assert data == make_ctx(dtype=dtype).to_bytes()  # the same context, the same bytes
    header_len = int.from_bytes(data[:8], "little")
    assert header_len % 8 == 0
    header = json.loads(data[8:8 + header_len])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    tensors = load(data)
    assert torch.equal(tensors["keys"], ctx.keys) and torch.equal(tensors["anchor_ids"], ctx.anchor_ids)
    back = CompressedContext.from_bytes(data)
    assert torch.equal(back.values, ctx.values) and back.extra == ctx.extra and back.source_tokens == ctx.source_tokens


def test_contexts_written_by_safetensors_itself_still_read():
    """Entries stored before this writer (safetensors.torch.save) parse to the same context."""
    ctx = make_ctx()
    header = json.loads(ctx.to_bytes()[8:8 + int.from_bytes(ctx.to_bytes()[:8], "little")])
    old = save(ctx._tensors(), metadata=header["__metadata__"])
    back = CompressedContext.from_bytes(old)
    assert torch.equal(back.keys, ctx.keys) and torch.equal(back.anchor_ids, ctx.anchor_ids)


def test_entry_bytes_from_raw_buffers_equal_the_store_encoding():
    ctx = make_ctx(seed=2)
    raw = CompressedContext._raw(ctx._tensors())
    made = store_format.entry_bytes("a" * 64, raw, mode="kv", k=ctx.k, source_tokens=ctx.source_tokens,
                                    base_fingerprint=ctx.base_fingerprint,
                                    compressor_fingerprint=ctx.compressor_fingerprint, extra=ctx.extra)
    assert made == encode_context("a" * 64, ctx)
    with pytest.raises(ValueError, match="NaN or infinite"):
        bad = dict(raw, keys=store_format.RawTensor("torch.bfloat16", raw["keys"].shape,
                                                    ctx.keys.clone().index_fill_(0, torch.tensor([1]), float("inf"))
                                                    .reshape(-1).view(torch.uint8).numpy()))
        store_format.check_tensors(bad)
    with pytest.raises(ValueError, match="bytes for a"):
        store_format.RawTensor("torch.float32", (2, 2), b"123")


def test_writer_pool_writes_what_put_many_writes_and_refuses_bad_batches_whole(tmp_path):
    ctxs = [make_ctx(seed=i, anchors=i % 2 == 0) for i in range(5)]
    texts = [f"chunk number {i}" for i in range(5)]
    items = [(key_of(t, c), c, t) for t, c in zip(texts, ctxs)]
    ref = ContextStore(tmp_path / "threads")
    ref.put_many(items)
    st = ContextStore(tmp_path / "procs")
    with WriterPool(st, 2) as pool:
        assert pool.put_many(items) == sum(len(encode_context(k, c)) for k, c, _ in items)
        nan = dataclasses.replace(ctxs[0], keys=ctxs[0].keys.clone().fill_(float("nan")))
        with pytest.raises(ValueError, match="NaN or infinite"):
            pool.put_many([(key_of("new one", nan), nan, "new one"), (key_of("new two", ctxs[1]), ctxs[1], "new two")])
        with pytest.raises(ValueError, match="key does not match"):
            pool.put_many([(key_of("other text", ctxs[1]), ctxs[1], "new three")])
        with pytest.raises(TypeError):
            pool.put_many([(items[0][0], "not a context", None)])
    for key, ctx, text in items:
        assert st._raw_get(st._kv, "ctx:" + key) == ref._raw_get(ref._kv, "ctx:" + key)
        assert st.get_text(key) == text and torch.equal(st.get(key).keys, ctx.keys)
    assert len(st) == len(items)  # nothing of the refused batches was kept
    with pytest.raises(ValueError, match="at least 1 process"):
        WriterPool(st, 0)
