"""Scale benchmark: what training and serving a compressor costs on models of 1B-8B parameters.

The models are randomly initialised with the exact shapes of public checkpoints (layers, hidden
size, heads, KV heads, MLP size, vocabulary, rotary settings), so memory and time are those of
the real models while nothing has to be downloaded. Per shape it measures:

* training: samples/s and peak GPU memory of the real training step
  (:func:`compressor_plugin.training.trainer.train_step` over
  :class:`~compressor_plugin.training.trainer.StepModule`), frozen bf16 base, LoRA r=16 on
  ``q_proj``/``v_proj``, for both stages at the shipped recipe's lengths (regeneration: texts
  of 256 tokens; QA: 192-token contexts, 1-3 chunks per prompt, the plain/fewshot/chat
  layouts), with and without gradient checkpointing;
* compression: chunks/s of 512-token chunks at a few batch sizes (the encoder alone);
* storage: bytes of one stored chunk (kv, k=16, bf16), as the store writes it;
* a store hit: read one chunk back from a :class:`~compressor_plugin.store.ContextStore` and
  answer a question from it (time to first token and total for 16 new tokens).
"""

from __future__ import annotations

import contextlib
import json
import platform
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

#: Shapes of public checkpoints: (family, transformers config fields).
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    # meta-llama/Llama-3.2-1B
    "llama-1b": ("llama", dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                               head_dim=64, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                               max_position_embeddings=131072, rms_norm_eps=1e-5,
                               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 8192})),
    # Qwen/Qwen2.5-3B
    "qwen-3b": ("qwen2", dict(num_hidden_layers=36, hidden_size=2048, num_attention_heads=16, num_key_value_heads=2,
                              intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True,
                              max_position_embeddings=32768, rms_norm_eps=1e-6,
                              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # meta-llama/Llama-3.1-8B
    "llama-8b": ("llama", dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                               head_dim=128, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                               max_position_embeddings=131072, rms_norm_eps=1e-5,
                               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 8192})),
    # HuggingFaceTB/SmolLM2-135M-Instruct, the default model (its training throughput at other batch sizes)
    "smollm2-135m": ("llama", dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                                   head_dim=64, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                                   max_position_embeddings=8192, rms_norm_eps=1e-5,
                                   rope_parameters={"rope_type": "default", "rope_theta": 100000.0})),
    # plumbing checks on CPU
    "tiny": ("llama", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=49152, tie_word_embeddings=True,
                           max_position_embeddings=4096)),
}

#: Lengths of the shipped recipe (docs/training.md).
REGEN_TOKENS = 256
QA_CONTEXT_TOKENS = 192
CHUNK_TOKENS = 512


@dataclass
class ScaleSettings:
    """What one benchmark run measures."""

    batch_sizes: tuple[int, ...] = (32,)  # training batch sizes, each measured
    steps: int = 5  # timed training steps per stage and setting
    warmup: int = 2
    stages: tuple[str, ...] = ("regen", "qa")
    checkpointing: tuple[bool, ...] = (False, True)
    compress_batch_sizes: tuple[int, ...] = (1, 16, 64)
    compress_repeats: int = 3
    k: int = 16
    max_new_tokens: int = 16
    seed: int = 0
    fused_kernels: bool = False  # Liger's Triton kernels in the training step (training/kernels.py)
    serving: bool = True  # also measure compression throughput and a store-hit answer


def shape_config(shape: str, tokenizer: Any) -> Any:
    """The transformers config of a named shape, with the tokenizer's special token ids."""
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    family, fields = SHAPES[shape]
    if len(tokenizer) > fields["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the {shape} vocabulary")
    return AutoConfig.for_model(family, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, **fields)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_gb(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None


def _samples(stage: str, n: int, tokenizer: Any, rng: random.Random) -> list[Any]:
    """Synthetic samples at the recipe's lengths (token ids drawn from the tokenizer's ordinary range)."""
    from ..training.data import QASample, RegenSample

    hi = min(len(tokenizer), 30000) - 1
    special = set(getattr(tokenizer, "all_special_ids", []))

    def ids(m: int) -> list[int]:
        out: list[int] = []
        while len(out) < m:
            t = rng.randint(100, hi)
            if t not in special:
                out.append(t)
        return out

    if stage == "regen":
        return [RegenSample(ids(REGEN_TOKENS)) for _ in range(n)]
    return [QASample(ids(QA_CONTEXT_TOKENS), "", f"What is item number {i} of the list?", f"the answer {i}")
            for i in range(n)]


def bench_training(base: Any, stage: str, checkpointing: bool, settings: ScaleSettings, data_file: str,
                   batch_size: int) -> dict[str, Any]:
    """Samples/s and peak memory of the real training step for one stage, setting and batch size."""
    from ..training.trainer import StepModule, TrainConfig, build_compressor, enable_mlp_checkpointing, train_step

    dev = base.device
    cfg = TrainConfig(stage=stage, mode="kv", k=settings.k, data=[data_file], batch_size=batch_size,
                      max_target_tokens=REGEN_TOKENS, gradient_checkpointing=checkpointing, seed=settings.seed,
                      fused_kernels=settings.fused_kernels)
    comp = build_compressor(base, cfg)
    head = {"stage": stage, "gradient_checkpointing": checkpointing, "fused_kernels": settings.fused_kernels,
            "batch_size": batch_size}
    try:
        if settings.fused_kernels:
            from ..training.kernels import apply_fused_kernels

            apply_fused_kernels(comp.peft_model)
        if checkpointing:
            enable_mlp_checkpointing(base.model)
        module = StepModule(base, cfg, comp)
        module.train()
        params = comp.trainable_parameters()
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98))
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
                    else contextlib.nullcontext())
        rng = random.Random(settings.seed)
        _reset_peak(dev)
        times, losses, tokens = [], [], 0
        for step in range(settings.warmup + settings.steps):
            samples = _samples(stage, batch_size, base.tokenizer, rng)
            _sync(dev)
            t0 = time.perf_counter()
            loss, info, _ = train_step(module, samples, settings.seed + step, opt, params, autocast)
            lv = float(loss)  # waits for the step
            _sync(dev)
            if step >= settings.warmup:
                times.append(time.perf_counter() - t0)
                losses.append(lv)
                tokens += info["enc_tokens"] + info["dec_tokens"]
        total = sum(times)
        return {**head, "steps": len(times), "seconds_per_step": total / len(times),
                "samples_per_s": batch_size * len(times) / total, "tokens_per_s": tokens / total,
                "peak_memory_gb": _peak_gb(dev), "loss": sum(losses) / len(losses), "status": "ok"}
    except torch.cuda.OutOfMemoryError as exc:
        return {**head, "status": "out of memory", "error": str(exc).splitlines()[0]}
    finally:
        _unwrap(base, comp)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _unwrap(base: Any, comp: Any) -> None:
    """Take the compressor's adapter out of the base model and undo MLP checkpointing."""
    from ..hf_compat import inner_model

    model = comp.peft_model.unload() if hasattr(comp.peft_model, "unload") else base.model
    for layer in inner_model(model).layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and getattr(mlp, "_compressor_plugin_ckpt", False):
            del mlp.forward
            del mlp._compressor_plugin_ckpt
    base.model = model
    model.requires_grad_(False)
    model.eval()


@torch.no_grad()
def bench_compression(comp: Any, settings: ScaleSettings) -> list[dict[str, Any]]:
    """Encoder throughput on 512-token chunks, per batch size."""
    dev = comp.device
    rng = random.Random(settings.seed)
    rows = []
    comp.peft_model.eval()
    for bs in settings.compress_batch_sizes:
        batch = [[rng.randint(100, 20000) for _ in range(CHUNK_TOKENS)] for _ in range(bs)]
        try:
            _reset_peak(dev)
            comp.encode_ids(batch)  # warm-up
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(settings.compress_repeats):
                out = comp.encode_ids(batch)
            _sync(dev)
            dt = (time.perf_counter() - t0) / settings.compress_repeats
            del out
            rows.append({"batch_size": bs, "chunks_per_s": bs / dt, "tokens_per_s": bs * CHUNK_TOKENS / dt,
                         "seconds_per_batch": dt, "peak_memory_gb": _peak_gb(dev), "status": "ok"})
        except torch.cuda.OutOfMemoryError:
            rows.append({"batch_size": bs, "status": "out of memory"})
            torch.cuda.empty_cache()
    return rows


def bench_store_hit(comp: Any, settings: ScaleSettings) -> dict[str, Any]:
    """Bytes of one stored chunk, and a question answered from a store hit."""
    from ..generation import Generator
    from ..store import ContextStore, context_key

    tok = comp.tokenizer
    text = " ".join(["The committee met on Tuesday and approved the budget for the new library."] * 30)
    ctx = comp.compress([text], truncate=True)[0].to(dtype=torch.bfloat16)
    key = context_key(text, base_fingerprint=ctx.base_fingerprint, compressor_fingerprint=ctx.compressor_fingerprint,
                      k=ctx.k, mode=ctx.mode, dtype=ctx.dtype)
    stored = len(ctx.to_bytes())
    gen = Generator(comp.base, comp)
    with tempfile.TemporaryDirectory() as folder:
        store = ContextStore(folder)
        store.put(key, ctx)
        prompt = ["Context: ", None, "\nQuestion: What did the committee approve?\nAnswer:"]
        runs = []
        for _ in range(3):  # the first run warms up kernels
            t0 = time.perf_counter()
            hit = store.get(key, device=comp.device)
            t_read = time.perf_counter() - t0
            prompt[1] = hit
            res = gen.generate(prompt, max_new_tokens=settings.max_new_tokens, temperature=0.0)
            runs.append({"read_s": t_read, "ttft_s": res.ttft_s + t_read, "total_s": res.total_s + t_read,
                         "new_tokens": len(res.token_ids), "prompt_positions": res.prompt_tokens})
        store.close()
    best = min(runs[1:], key=lambda r: r["total_s"])
    L, H, k, D = ctx.keys.shape
    return {"stored_bytes_per_chunk": stored, "tensor_bytes_per_chunk": ctx.nbytes,
            "formula": f"2 (K and V) x {L} layers x {H} kv heads x {k} tokens x {D} head dim x 2 bytes = "
                       f"{2 * L * H * k * D * 2}",
            "source_tokens": ctx.source_tokens, "store_hit": best, "tokenizer_vocab": len(tok)}


def bench_scale(shapes: Sequence[str], *, device: str | None = None, settings: ScaleSettings | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Run the scale benchmark for each shape; returns a JSON-ready dict (see :func:`scale_table`)."""
    from ..models import default_device, ensure_default_model, random_base_model
    from ..compressor import Compressor, CompressorConfig
    from transformers import AutoTokenizer

    settings = settings or ScaleSettings()
    dev = torch.device(device) if device else default_device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data_file = str(Path(tmp) / "placeholder.jsonl")
        Path(data_file).write_text('{"text": "unused: the benchmark makes its own samples"}\n')
        for shape in shapes:
            cfg = shape_config(shape, tokenizer)
            t0 = time.perf_counter()
            base = random_base_model(cfg, tokenizer, seed=settings.seed, name=f"random-{shape}", dtype=dtype,
                                     device=dev)
            _sync(dev)
            build_s = time.perf_counter() - t0
            n_params = sum(p.numel() for p in base.model.parameters())
            entry: dict[str, Any] = {"shape": shape, "family": cfg.model_type, "parameters": n_params,
                                     "build_seconds": build_s, "training": []}
            for stage in settings.stages:
                for ckpt in settings.checkpointing:
                    for bs in settings.batch_sizes:
                        row = bench_training(base, stage, ckpt, settings, data_file, bs)
                        entry["training"].append(row)
                        if progress:
                            print(f"{shape} train {stage} checkpointing={ckpt} batch={bs}: {json.dumps(row)}",
                                  flush=True)
            if not settings.serving:
                results.append(entry)
                del base
                continue
            comp = Compressor(base, CompressorConfig(k=settings.k, lora_r=16, max_length=CHUNK_TOKENS),
                              seed=settings.seed)
            comp.to(dev)
            entry["compression"] = bench_compression(comp, settings)
            entry.update(bench_store_hit(comp, settings))
            if progress:
                print(f"{shape} compression: {json.dumps(entry['compression'])}", flush=True)
            results.append(entry)
            del comp, base
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    env = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "dtype": str(dtype).replace("torch.", "")}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return {"config": {**asdict(settings), "shapes": list(shapes), "regen_tokens": REGEN_TOKENS,
                       "qa_context_tokens": QA_CONTEXT_TOKENS, "chunk_tokens": CHUNK_TOKENS,
                       "lora": "r=16, alpha=32, q_proj,v_proj", **env},
            "results": results}


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def scale_table(result: dict[str, Any]) -> str:
    """Markdown tables of a :func:`bench_scale` result."""
    lines = ["| shape | params | stage | grad. ckpt | fused kernels | batch | samples/s | s/step | peak GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in result["results"]:
        for r in e["training"]:
            if r.get("status") != "ok":
                lines.append(f"| {e['shape']} | {_params(e['parameters'])} | {r['stage']} | "
                             f"{'on' if r['gradient_checkpointing'] else 'off'} | "
                             f"{'on' if r.get('fused_kernels') else 'off'} | {r['batch_size']} | {r['status']} | | |")
                continue
            peak = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
            lines.append(f"| {e['shape']} | {_params(e['parameters'])} | {r['stage']} | "
                         f"{'on' if r['gradient_checkpointing'] else 'off'} | "
                         f"{'on' if r.get('fused_kernels') else 'off'} | {r['batch_size']} | "
                         f"{r['samples_per_s']:.1f} | {r['seconds_per_step']:.2f} | {peak} |")
    lines += ["", "| shape | compression chunks/s (512 tokens) by batch | stored bytes/chunk (k=16, bf16) | "
                  "store hit: TTFT s | store hit: 16 tokens s |", "|---|---|---|---|---|"]
    for e in result["results"]:
        if "compression" not in e:
            continue
        comp = ", ".join(f"{c['batch_size']}: {c['chunks_per_s']:.1f}" if c.get("status") == "ok"
                         else f"{c['batch_size']}: {c['status']}" for c in e["compression"])
        hit = e["store_hit"]
        lines.append(f"| {e['shape']} | {comp} | {e['stored_bytes_per_chunk']:,} | {hit['ttft_s']:.3f} | "
                     f"{hit['total_s']:.3f} |")
    return "\n".join(lines)


def write_scale(result: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``scale.json`` and ``scale.md`` into folder ``out``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    js, md = folder / "scale.json", folder / "scale.md"
    js.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md.write_text(scale_table(result) + "\n")
    return js, md
