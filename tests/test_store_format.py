"""The bytes of stored entries (compressor_plugin.store_format)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load, save

from compressor_plugin import store_format
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



def test_two_stores_keep_the_same_bytes_for_the_same_chunk(tmp_path):
    """Entry bytes depend on the content alone, so a copy or a remote tier can compare bytes."""
    ctx, text = make_ctx(seed=4), "the same chunk"
    key = key_of(text, ctx)
    raw = []
    for name in ("a", "b"):
        with ContextStore(tmp_path / name) as st:
            st.put(key, ctx, text)
            raw.append((st._raw_get(st._kv, "ctx:" + key), st._raw_get(st._text, "text:" + key)))
            assert torch.equal(st.get(key).keys, ctx.keys) and st.get_text(key) == text
    assert raw[0] == raw[1] and isinstance(raw[0][0], bytes)


def test_a_batch_of_value_files_shares_one_fan_out_folder(tmp_path):
    """set_many descends the ab/cd folder tree once per batch; single writes each pick their own."""
    from compressor_plugin.store_backend import SafeCache

    cache = SafeCache(tmp_path / "c", size_limit=2**40, min_file_size=16)
    cache.set_many([(f"k{i}", bytes([i]) * 64) for i in range(6)])
    for i in range(6):
        cache.set(f"s{i}", bytes([i]) * 64)
    files = [p.relative_to(tmp_path / "c") for p in (tmp_path / "c").rglob("*.val")]
    assert len(files) == 12
    folders = {}
    for f in files:
        folders.setdefault(f.parent, []).append(f)
    assert max(len(v) for v in folders.values()) >= 6  # the batch's six files in one folder
    assert [cache.get(f"k{i}") for i in range(6)] == [bytes([i]) * 64 for i in range(6)]
    assert [cache.get(f"s{i}") for i in range(6)] == [bytes([i]) * 64 for i in range(6)]
