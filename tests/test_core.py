"""Core behaviour: K/V injection, re-rotation, adapter isolation, batching, round trips, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from compressor_plugin.compressor import (CheckpointMismatchError, Compressor, CompressorConfig, CompressorError,
                                          ContextTooLongError)
from compressor_plugin.context import CompressedContext, ContextFormatError
from compressor_plugin.generation import ContextMismatchError, GenerationConfig, Generator, PromptError, TokenIds
from compressor_plugin.models import load_base_model, model_fingerprint

CTX = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
       "It was designed by the company of Gustave Eiffel and completed in 1889 for the World's Fair.")
QUESTION = "\nQuestion: When was the Eiffel Tower completed?\nAnswer:"


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_injected_full_kv_reproduces_plain_generation(base, generator):
    tok = base.tokenizer
    cid, qid = _ids(tok, CTX), _ids(tok, QUESTION)
    plain = generator.generate([TokenIds(cid + qid)], max_new_tokens=16)
    ctx = generator.context_from_text(cid)
    injected = generator.generate([ctx, TokenIds(qid)], max_new_tokens=16)
    assert injected.token_ids == plain.token_ids
    assert "1889" in plain.text
    assert injected.compressed_tokens == len(cid) and injected.text_tokens == len(qid)


def _prefill_segment_by_segment(gen, segments):
    """Reference prefill: one forward per text run, each kv context put in the cache where it comes."""
    from compressor_plugin.hf_compat import cache_kwargs, new_cache

    with torch.no_grad(), gen._decoder() as lm:
        cache, pos, logits, pending = new_cache(lm.config), 0, None, []

        def flush():
            nonlocal pos, logits
            if pending:
                ids = torch.tensor([pending])
                out = lm(input_ids=ids, position_ids=torch.arange(pos, pos + len(pending))[None], use_cache=True,
                         **cache_kwargs(lm, cache))
                logits, pos = out.logits[0, -1], pos + len(pending)
                pending.clear()

        for seg in segments:
            if isinstance(seg, str):
                pending.extend(gen.tokenizer(seg, add_special_tokens=False)["input_ids"])
            elif seg.mode == "kv":
                flush()
                keys = seg.keys_at(pos, gen.rotary)
                for layer in range(keys.shape[0]):
                    cache.update(keys[layer][None], seg.values[layer][None], layer)
                pos += seg.k
            else:
                flush()
                out = lm(inputs_embeds=seg.embeddings[None], position_ids=torch.arange(pos, pos + seg.k)[None],
                         use_cache=True, **cache_kwargs(lm, cache))
                logits, pos = out.logits[0, -1], pos + seg.k
        flush()
    return logits, pos


def test_one_forward_prefill_equals_segment_by_segment(generator):
    a = generator.context_from_text("The Eiffel Tower was completed in 1889.")
    b = generator.context_from_text("Mount Kilimanjaro is in Tanzania.")
    prompt = ["Context: ", a, "\n\n", b, "\nQuestion: Where is Kilimanjaro?\nAnswer:"]
    ref_logits, ref_len = _prefill_segment_by_segment(generator, prompt)
    pre = generator.prefill(prompt)
    assert pre.length == ref_len == pre.text_tokens + a.k + b.k
    # Equal logits also prove the mask: text before a chunk must not see it ("Context: " would
    # otherwise attend to both chunks and change every later position).
    torch.testing.assert_close(pre.last_logits, ref_logits.float(), atol=2e-4, rtol=1e-4)


def test_prefill_refuses_attention_without_4d_masks(tiny):
    gen = Generator(tiny)
    ctx = gen.context_from_text("some context")
    cfg = tiny.model.config
    old = cfg._attn_implementation
    cfg._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(PromptError, match="4D mask"):
            gen.prefill([ctx, " question"])
    finally:
        cfg._attn_implementation = old


def test_one_forward_prefill_with_embedding_contexts():
    from compressor_plugin.compressor import Compressor, CompressorConfig
    from compressor_plugin.models import tiny_random_llama

    comp = Compressor(tiny_random_llama(seed=2), CompressorConfig(k=3, mode="embedding", lora_r=4, max_length=64))
    gen = Generator(comp.base, comp)
    x, y = comp.compress(["first short text", "a second text"])
    prompt = ["intro ", x, " middle ", y, " end"]
    ref_logits, ref_len = _prefill_segment_by_segment(gen, prompt)
    pre = gen.prefill(prompt)
    assert pre.length == ref_len
    torch.testing.assert_close(pre.last_logits, ref_logits.float(), atol=1e-4, rtol=1e-4)


def test_rerotation_matches_kv_computed_at_position(base, generator):
    """A chunk placed at position p gives the logits of K/V computed there."""
    tok = base.tokenizer
    cid, qid = _ids(tok, CTX), _ids(tok, QUESTION)
    prefix = _ids(tok, "Read this passage carefully, then answer.\n")
    p = len(prefix)
    at_zero = generator.context_from_text(cid, start=0)
    at_p = generator.context_from_text(cid, start=p)
    # same position-free keys whichever position they were computed at
    torch.testing.assert_close(at_zero.keys, at_p.keys, atol=2e-4, rtol=1e-4)
    # placing the position-0 chunk at p gives the logits of the chunk computed at p
    pre_a = generator.prefill([TokenIds(prefix), at_zero, TokenIds(qid)])
    pre_b = generator.prefill([TokenIds(prefix), at_p, TokenIds(qid)])
    torch.testing.assert_close(pre_a.last_logits, pre_b.last_logits, atol=1e-3, rtol=1e-4)
    # and a wrong placement changes them (the check above can fail)
    wrong = at_zero.to()
    wrong.keys = generator.rotary.rotate(at_zero.keys, torch.arange(40, 40 + at_zero.k))
    pre_c = generator.prefill([TokenIds(prefix), wrong, TokenIds(qid)])
    assert (pre_c.last_logits - pre_a.last_logits).abs().max() > 1e-2


def test_disabled_adapter_gives_exact_base_outputs():
    base_plain = load_base_model(device="cpu")
    ids = torch.tensor([_ids(base_plain.tokenizer, CTX)])
    with torch.no_grad():
        ref = base_plain.model(input_ids=ids).logits.clone()
    comp = Compressor(load_base_model(device="cpu"), CompressorConfig(k=4))
    # make the adapter non-trivial, so "enabled" differs from "disabled"
    with torch.no_grad():
        for n, p in comp.peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    with torch.no_grad():
        with comp.decoder() as lm:
            dec = lm(input_ids=ids).logits
        enc = comp.peft_model(input_ids=ids).logits
    assert torch.equal(dec, ref)
    assert not torch.allclose(enc, ref)


def test_batch_equals_one_by_one(tiny_compressor):
    texts = ["short text", "a somewhat longer text with more tokens in it", "medium length text here"]
    together = tiny_compressor.compress(texts, batch_size=3)
    alone = [tiny_compressor.compress([t])[0] for t in texts]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4)
        assert a.source_tokens == b.source_tokens


@pytest.mark.parametrize("compile", [False, True])
def test_fast_encoder_matches_and_restores_weights(tiny_compressor, compile):
    comp = tiny_compressor
    with torch.no_grad():
        for n, p in comp.peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    texts = ["short text", "a somewhat longer text with more tokens in it"]
    before = {n: p.detach().clone() for n, p in comp.peft_model.named_parameters()}
    plain = comp.compress(texts)
    import torch._dynamo.config as dynamo_config

    limit = dynamo_config.recompile_limit
    with comp.fast_encoder(merge=True, compile=compile):
        if compile:  # one compiled variant per block is allowed while compiled
            assert dynamo_config.recompile_limit >= len(comp.peft_model.base_model.model.model.layers) + 8
        fast = comp.compress(texts)
        changed = [n for n, p in comp.peft_model.named_parameters()
                   if "base_layer" in n and not torch.equal(p, before[n])]
        assert changed, "merging changed no base weight"
    for a, b in zip(plain, fast):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(a.values, b.values, atol=1e-4, rtol=1e-3)
    for n, p in comp.peft_model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert dynamo_config.recompile_limit == limit
    again = comp.compress(texts)
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(plain, again))


def test_generate_batch_equals_single(generator):
    prompts = [[CTX + QUESTION], ["The capital of France is"]]
    batch = generator.generate_batch(prompts, max_new_tokens=8)
    single = [generator.generate(p, max_new_tokens=8) for p in prompts]
    assert [r.token_ids for r in batch] == [r.token_ids for r in single]


def test_stream_result_equals_generate(generator):
    full = generator.generate([CTX + QUESTION], max_new_tokens=12)
    stream = generator.stream_result([CTX + QUESTION], max_new_tokens=12)
    assert stream.result is None
    pieces = list(stream)
    res = stream.result
    assert "".join(pieces) == res.text == full.text
    assert (res.token_ids, res.finish_reason, res.prompt_tokens, res.text_tokens) == \
        (full.token_ids, full.finish_reason, full.prompt_tokens, full.text_tokens)
    assert list(stream) == []  # a stream runs once


def test_stream_and_stop_strings(generator):
    full = generator.generate([CTX + QUESTION], max_new_tokens=20)
    pieces = list(generator.stream([CTX + QUESTION], max_new_tokens=20))
    assert "".join(pieces) == full.text
    stopped = generator.generate([CTX + QUESTION], GenerationConfig(max_new_tokens=20, stop=["1889"]))
    assert "1889" not in stopped.text and stopped.finish_reason == "stop"


@pytest.mark.parametrize("mode,k", [("kv", 4), ("embedding", 2)])
def test_modes_compress_and_generate(mode, k):
    from compressor_plugin.models import tiny_random_llama

    comp = Compressor(tiny_random_llama(seed=2), CompressorConfig(k=k, mode=mode, lora_r=4))
    ctx = comp.compress(["hello world, this is a test"])[0]
    assert ctx.mode == mode and ctx.k == k
    if mode == "kv":
        assert ctx.keys.shape == (2, 2, k, 16)
    else:
        assert ctx.embeddings.shape == (k, 64)
    out = Generator(comp.base, comp).generate([ctx, "\nAnswer:"], max_new_tokens=3)
    assert out.compressed_tokens == k and out.source_tokens == ctx.source_tokens


def test_bytes_round_trip_and_corruption(tiny_compressor):
    ctx = tiny_compressor.compress(["round trip me"])[0]
    data = ctx.to_bytes()
    back = CompressedContext.from_bytes(data)
    assert torch.equal(back.keys, ctx.keys) and torch.equal(back.values, ctx.values)
    assert (back.k, back.source_tokens, back.compressor_fingerprint) == (ctx.k, ctx.source_tokens, ctx.compressor_fingerprint)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    with pytest.raises(ContextFormatError, match="digest"):
        CompressedContext.from_bytes(bytes(flipped))
    with pytest.raises(ContextFormatError):
        CompressedContext.from_bytes(data[: len(data) // 2])
    with pytest.raises(ContextFormatError):
        CompressedContext.from_bytes(b"\x80\x04pickle")
    with pytest.raises(ContextFormatError):
        CompressedContext.from_bytes("not bytes")  # type: ignore[arg-type]
    # the digest a caller computed already (the store's put) gives the same bytes; a wrong one is refused
    from compressor_plugin.store import encode_context

    def header(raw: bytes) -> dict:  # safetensors writes the metadata keys in no fixed order
        return json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])

    given = ctx.to_bytes(tensor_digest=CompressedContext._digest(ctx.to("cpu")._tensors()))
    assert header(given) == header(data) and given[-64:] == data[-64:]
    with pytest.raises(ContextFormatError, match="digest"):
        CompressedContext.from_bytes(ctx.to_bytes(tensor_digest="0" * 64))
    stored = CompressedContext.from_bytes(encode_context("k" * 64, ctx))
    assert torch.equal(stored.keys, ctx.keys) and stored.extra["store_key"] == "k" * 64


def test_checkpoint_round_trip_and_mismatch(tmp_path, tiny_compressor):
    with torch.no_grad():
        for n, p in tiny_compressor.peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    tiny_compressor.invalidate_fingerprint()
    path = tiny_compressor.save_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    meta = json.loads((path / "config.json").read_text())
    assert meta["config"]["k"] == 4 and meta["fingerprint"] == tiny_compressor.fingerprint
    from compressor_plugin.models import tiny_random_llama

    loaded = Compressor.from_pretrained(path, base=tiny_random_llama(seed=1))
    assert loaded.fingerprint == tiny_compressor.fingerprint
    a = tiny_compressor.compress(["same text"])[0]
    b = loaded.compress(["same text"])[0]
    torch.testing.assert_close(a.keys, b.keys)
    with pytest.raises(CheckpointMismatchError, match="fingerprint"):
        Compressor.from_pretrained(path, base=tiny_random_llama(seed=5))


def test_bad_input_errors(tiny_compressor, generator):
    with pytest.raises(CompressorError, match="empty"):
        tiny_compressor.compress(["   "])
    with pytest.raises(CompressorError, match="not str"):
        tiny_compressor.compress([123])  # type: ignore[list-item]
    with pytest.raises(CompressorError, match="list of texts"):
        tiny_compressor.compress("a single string")  # type: ignore[arg-type]
    with pytest.raises(ContextTooLongError, match="max_length=64"):
        tiny_compressor.compress(["word " * 200])
    ctx = tiny_compressor.compress(["word " * 200], truncate=True)[0]
    assert ctx.source_tokens == 64 and ctx.extra.get("truncated") == "true"
    # a context from another base model is refused by the generator
    with pytest.raises(ContextMismatchError):
        generator.generate([ctx, "question"], max_new_tokens=2)
    with pytest.raises(PromptError, match="end with text"):
        generator.generate([generator.context_from_text("hello there")], max_new_tokens=2)
    with pytest.raises(PromptError, match="empty"):
        generator.generate([], max_new_tokens=2)
    with pytest.raises(ValueError, match="mode"):
        CompressorConfig(mode="zip")


def test_fingerprint_is_dtype_independent(base):
    bf16 = load_base_model(device="cpu", dtype="bf16")
    assert model_fingerprint(bf16.model) == base.fingerprint


def test_unsupported_model_type_is_refused():
    from types import SimpleNamespace

    from compressor_plugin.models import UnsupportedModelError, check_supported

    with pytest.raises(UnsupportedModelError, match="gpt2"):
        check_supported(SimpleNamespace(model_type="gpt2"))


def test_stop_strings_ignore_leading_whitespace():
    from compressor_plugin.generation import _find_stop

    assert _find_stop("\nRobert Boyle\nQuestion", ["\n"]) == len("\nRobert Boyle")
    assert _find_stop("Paris\n", ["\n"]) == 5
    assert _find_stop("\n\n", ["\n"]) is None
    assert _find_stop("no stop here", ["\n", "###"]) is None


def test_compress_between_streamed_tokens_uses_the_encoder(tmp_path):
    """Compressing while a stream is paused must not run with the adapter disabled."""
    from compressor_plugin.engine import CompressionEngine
    from compressor_plugin.models import tiny_random_llama
    from compressor_plugin.store import ContextStore

    comp = Compressor(tiny_random_llama(seed=4), CompressorConfig(k=2, lora_r=4))
    with torch.no_grad():
        for n, p in comp.peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    comp.invalidate_fingerprint()
    reference = comp.compress(["some chunk text"])[0]
    engine = CompressionEngine(comp, ContextStore(tmp_path / "store"))
    stream = engine.stream("Hello there, this is a prompt", max_new_tokens=5)
    next(stream)
    during = comp.compress(["some chunk text"])[0]
    stream.close()
    torch.testing.assert_close(during.keys, reference.keys)


def test_one_compressor_per_base_model_and_no_silent_adapter():
    from compressor_plugin.models import tiny_random_llama

    base = tiny_random_llama(seed=6)
    comp = Compressor(base, CompressorConfig(k=2, lora_r=2))
    with pytest.raises(ValueError, match="already carries an adapter"):
        Compressor(base, CompressorConfig(k=4, lora_r=2))
    with pytest.raises(ValueError, match="pass the compressor too"):
        Generator(base)
    assert Generator(base, comp).generate(["hello"], max_new_tokens=2).prompt_tokens > 0


def test_fingerprint_sees_every_weight_matrix():
    from compressor_plugin.models import tiny_random_llama

    base = tiny_random_llama(seed=7)
    before = model_fingerprint(base.model)
    with torch.no_grad():
        base.model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    assert model_fingerprint(base.model) != before


def test_stop_as_a_single_string_and_config_conflicts():
    cfg = GenerationConfig(stop="World")
    assert cfg.stop == ("World",)
    with pytest.raises(ValueError, match="stop"):
        GenerationConfig(stop=[1])  # type: ignore[list-item]
    from compressor_plugin.generation import _make_config

    with pytest.raises(TypeError, match="either config or keyword"):
        _make_config(GenerationConfig(), {"max_new_tokens": 3})


def test_stream_consumed_from_other_threads_does_not_block_the_engine(tmp_path):
    import threading

    from compressor_plugin.engine import CompressionEngine
    from compressor_plugin.models import tiny_random_llama
    from compressor_plugin.store import ContextStore

    engine = CompressionEngine(Compressor(tiny_random_llama(seed=8), CompressorConfig(k=2, lora_r=2)),
                               ContextStore(tmp_path / "s"))
    stream = engine.stream("Hello there, a prompt", max_new_tokens=4)
    errors = []

    def step():
        try:
            next(stream, None)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    for _ in range(6):
        t = threading.Thread(target=step)
        t.start()
        t.join(timeout=30)
    done = []
    long_chunk = ("Another chunk, long enough to be compressed: the harbour of Velmora was rebuilt in 1871 after a "
                  "storm destroyed the old wooden piers, and the new stone quay is still in use today.")
    t = threading.Thread(target=lambda: done.append(engine.mark([long_chunk])))
    t.start()
    t.join(timeout=30)
    assert not errors and done and done[0][0].startswith("[[cc:")


def test_short_chunks_stay_text():
    """The short-chunk rule: a chunk not longer than k + margin tokens is kept as text, by
    CompressionEngine.mark and by the integration core (so tokens_saved is never negative)."""
    from compressor_plugin.compressor import Compressor, CompressorConfig
    from compressor_plugin.engine import SHORT_TEXT_MARGIN, CompressionEngine
    from compressor_plugin.integrations.core import CompressionOptions, compress_texts
    from compressor_plugin.models import tiny_random_llama
    from compressor_plugin.store import ContextStore
    import tempfile

    comp = Compressor(tiny_random_llama(seed=2), CompressorConfig(k=4, mode="kv", lora_r=4, max_length=64))
    with tempfile.TemporaryDirectory() as folder:
        from compressor_plugin.anchors import DEFAULT_ANCHORS

        assert CompressionEngine(comp, ContextStore(folder)).keep_text_tokens == 4 + DEFAULT_ANCHORS + SHORT_TEXT_MARGIN
        engine = CompressionEngine(comp, ContextStore(folder), anchors=0)
        assert engine.keep_text_tokens == 4 + SHORT_TEXT_MARGIN
        short = "Paris, 1889."
        long = " ".join(f"w{i}" for i in range(20))
        assert engine.count_tokens(short) <= engine.keep_text_tokens < engine.count_tokens(long)
        marked = engine.mark([short, long])
        assert marked[0] == short and marked[1].startswith("[[cc:")
        assert len(engine.store) == 1  # the short chunk was never compressed or stored
        res = compress_texts(engine, [short, long], CompressionOptions())
        assert res[0] is None and res[1] is not None and res[1].source_tokens > res[1].compressed_tokens
