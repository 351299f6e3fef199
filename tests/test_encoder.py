"""The encoder keeps only the memory positions' K/V, and one encode path serves compress and cache build."""

from __future__ import annotations

import torch

from compressor_plugin.caching.build import encode_contexts
from compressor_plugin.compressor import memory_slot_cache
from compressor_plugin.hf_compat import cache_kwargs, cache_layer, inner_model, new_cache

TEXTS = ["short text", "a somewhat longer text with more tokens in it", "medium length text here"]


def _nontrivial(comp):
    with torch.no_grad():
        for n, p in comp.peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    comp.invalidate_fingerprint()
    return comp


def _reference_encode(comp, batch):
    """The encoder as it was: cache every position of every layer, gather the memory slots at the end."""
    from compressor_plugin.compressor import causal_lm_of

    lm = causal_lm_of(comp.peft_model)
    k = comp.k
    lengths = torch.tensor([len(x) for x in batch])
    T = int(lengths.max())
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    for i, row in enumerate(batch):
        ids[i, : len(row)] = torch.tensor(row)
    tok = lm.get_input_embeddings()(ids)
    B, H = len(batch), tok.shape[-1]
    full = torch.cat([tok, torch.zeros(B, k, H)], dim=1)
    mem_pos = lengths[:, None] + torch.arange(k)[None, :]
    for b in range(B):
        full[b, mem_pos[b]] = comp.memory.detach()
    cache = new_cache(lm.config)
    body = inner_model(comp.peft_model)
    pos = torch.arange(T + k)[None].expand(B, -1)
    body(inputs_embeds=full, position_ids=pos, use_cache=True, **cache_kwargs(body, cache))
    keys, values = [], []
    for layer in range(lm.config.num_hidden_layers):
        kl, vl = cache_layer(cache, layer)
        idx = mem_pos[:, None, :, None].expand(B, kl.shape[1], k, kl.shape[-1])
        keys.append(torch.gather(kl, 2, idx))
        values.append(torch.gather(vl, 2, idx))
    return comp.rotary.unrotate(torch.stack(keys, 1), mem_pos[:, None, None, :]), torch.stack(values, 1)


def test_memory_slot_encoder_equals_full_cache_encoder(tiny_compressor):
    comp = _nontrivial(tiny_compressor)
    batch = comp.tokenize(TEXTS)
    with torch.no_grad():
        out = comp.encode_ids(batch)
        ref_k, ref_v = _reference_encode(comp, batch)
    assert out["keys"].shape == ref_k.shape == (3, 2, 2, comp.k, 16)
    torch.testing.assert_close(out["keys"], ref_k, atol=1e-6, rtol=1e-5)
    assert torch.equal(out["values"], ref_v)


def test_memory_slot_cache_keeps_only_the_given_positions(tiny_compressor):
    cfg = tiny_compressor.base.model.config
    positions = torch.tensor([[3, 4], [7, 8]])
    cache = memory_slot_cache(cfg, positions)
    k = torch.randn(2, 2, 10, 16)
    v = torch.randn(2, 2, 10, 16)
    assert cache.update(k, v, 0) == (k, v)  # attention still sees the whole sequence
    kept_k, kept_v = cache.kept[0]
    assert kept_k.shape == (2, 2, 2, 16)
    assert torch.equal(kept_k[1], k[1, :, 7:9]) and torch.equal(kept_v[0], v[0, :, 3:5])
    assert cache.get_seq_length() == 0  # nothing else is stored


def test_compress_and_cache_build_share_one_encode_path(tiny_compressor):
    comp = _nontrivial(tiny_compressor)
    api = comp.compress(TEXTS, batch_size=3)
    built = encode_contexts(comp, comp.tokenize(TEXTS))
    for a, b in zip(api, built):
        assert b.device.type == "cpu"
        assert torch.equal(a.keys.cpu(), b.keys) and torch.equal(a.values.cpu(), b.values)
        assert (a.source_tokens, a.compressor_fingerprint, a.base_fingerprint, a.extra) == \
            (b.source_tokens, b.compressor_fingerprint, b.base_fingerprint, b.extra)
    # contexts made on the device own their storage (no view of the whole batch)
    assert api[0].keys.untyped_storage().nbytes() == api[0].keys.numel() * api[0].keys.element_size()


def test_bf16_compressor_runs_its_adapter_in_bf16(tmp_path, tiny_compressor):
    from compressor_plugin.compressor import Compressor
    from compressor_plugin.models import tiny_random_llama

    comp = _nontrivial(tiny_compressor)
    path = comp.save_pretrained(tmp_path / "ckpt")  # bf16 weights, as shipped
    fp32 = Compressor.from_pretrained(path, base=tiny_random_llama(seed=1))
    base = tiny_random_llama(seed=1)
    base.model.to(torch.bfloat16)
    bf16 = Compressor.from_pretrained(path, base=base)
    assert all(p.dtype == torch.float32 for n, p in bf16.peft_model.named_parameters() if "lora_" in n)  # training
    bf16.match_adapter_dtype()
    lora = [p for n, p in bf16.peft_model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.bfloat16 for p in lora)
    assert all(p.dtype == torch.float32 for n, p in fp32.peft_model.named_parameters() if "lora_" in n)
    bf16.invalidate_fingerprint()
    assert bf16.fingerprint == fp32.fingerprint  # the bf16 checkpoint values are kept exactly
    a = fp32.compress(TEXTS)[0]
    b = bf16.compress(TEXTS)[0]
    assert b.keys.dtype == torch.bfloat16
    torch.testing.assert_close(b.keys.float(), a.keys, atol=0.1, rtol=0.05)
