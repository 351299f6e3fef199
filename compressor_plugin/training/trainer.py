"""Training loop: regeneration pretraining and QA fine-tuning of a compressor.

Only the LoRA adapter and the memory embeddings train; the decoder is the unchanged base model
(adapter disabled). Every step lays samples out as the LLM wrappers do at answer time:

    [layout prefix text][chunk 1 .. chunk n, compressed, back to back][question / cue][target]

with 1..n chunks in random order (the others are other samples' contexts from the same batch,
compressed once per step), an optional random position gap before the chunks, and the three
QA layouts (``plain``, ``fewshot``, ``chat``). Keys are stored position-free and rotated to the
slots they occupy, exactly as :class:`~compressor_plugin.generation.Generator` does.

The ``full-tuned`` mode trains a plain LoRA on the decoder with the full text as context. It is
a reference for evaluation only (it separates what QA training adds from what compression
loses) and is never used by the product.

Runs on CPU or GPU (bf16 autocast), is resumable, logs JSONL, and runs under
``torchrun --nproc_per_node N`` (DDP; NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..compressor import Compressor, CompressorConfig, resolve_checkpoint
from ..context import RotaryHelper
from ..hf_compat import cache_kwargs, causal_lm, inner_model, new_cache
from ..models import BaseModel, load_base_model, with_bos
from ..prompts import QA_LAYOUTS, REGEN_CUE, qa_prompt
from .data import QASample, RegenSample, batch_stream, load_qa, load_regen

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``train_config.json``)."""

    stage: str = "regen"  # "regen" or "qa"
    mode: str = "kv"  # "kv", "embedding" or "full-tuned"
    k: int = 16
    data: list[str] = field(default_factory=list)
    val_data: list[str] = field(default_factory=list)
    output: str = "runs/compressor"
    base: str = "default"
    init: str | None = None  # checkpoint to start from (e.g. the regen stage's output)
    lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    batch_size: int = 32
    max_steps: int | None = None
    max_minutes: float | None = None
    max_tokens: int = 512  # encoder input (chunk) length cap
    max_target_tokens: int = 384  # regeneration target cap
    max_chunks: int = 3  # QA: up to this many chunks per prompt (gold + distractors)
    layouts: list[str] = field(default_factory=lambda: list(QA_LAYOUTS))
    max_gap: int = 32  # random position gap before the chunks (half the steps use none)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    device: str | None = None
    seed: int = 0
    log_every: int = 20
    eval_every: int = 200
    save_every: int = 500
    val_samples: int = 128
    limit: int | None = None  # read at most this many rows per data file
    gradient_checkpointing: bool = False  # recompute the frozen MLP blocks in the backward pass

    def __post_init__(self) -> None:
        if self.stage not in ("regen", "qa"):
            raise ValueError("stage must be 'regen' or 'qa'")
        if self.mode not in ("kv", "embedding", "full-tuned"):
            raise ValueError("mode must be 'kv', 'embedding' or 'full-tuned'")
        if self.mode == "full-tuned" and self.stage != "qa":
            raise ValueError("the full-tuned reference is a QA model: use --stage qa")
        if not self.data:
            raise ValueError("give at least one training data file")
        for p in list(self.data) + list(self.val_data):
            if not Path(p).is_file():
                raise FileNotFoundError(f"data file not found: {p}")
        bad = [l for l in self.layouts if l not in QA_LAYOUTS]
        if bad:
            raise ValueError(f"unknown layouts {bad}; choose from {QA_LAYOUTS}")


# ---------------------------------------------------------------------------------------------
class StepModule(nn.Module):
    """Computes the training loss of one batch (a module so DDP can wrap it)."""

    def __init__(self, base: BaseModel, cfg: TrainConfig, compressor: Compressor | None, peft_model: Any = None):
        super().__init__()
        self.base = base
        self.cfg = cfg
        self.compressor = compressor
        self.peft_model = peft_model if compressor is None else compressor.peft_model
        self.rotary = RotaryHelper(base.model)
        self.tok = base.tokenizer
        self._prefix_cache: dict[str, tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    # ---------------- helpers
    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    @torch.no_grad()
    def prefix_kv(self, text: str) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """K/V of a constant prefix text under the frozen decoder (computed once, no grad)."""
        if text not in self._prefix_cache:
            ids = with_bos(self.tok, self._ids(text))
            kv: list[tuple[torch.Tensor, torch.Tensor]] = []
            if ids:
                with self.compressor.decoder() as lm:
                    cache = new_cache(lm.config)
                    dev = self.base.device
                    inner_model(lm)(input_ids=torch.tensor([ids], device=dev), use_cache=True,
                                    position_ids=torch.arange(len(ids), device=dev)[None], **cache_kwargs(inner_model(lm), cache))
                    from ..hf_compat import cache_layer

                    kv = [tuple(t.detach() for t in cache_layer(cache, i)) for i in range(lm.config.num_hidden_layers)]
            self._prefix_cache[text] = (ids, kv)
        ids, kv = self._prefix_cache[text]
        return len(ids), kv

    def _loss_from_hidden(self, lm: Any, hidden: torch.Tensor, sel: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = hidden[sel]
        logits = lm.lm_head(h).float()
        return nn.functional.cross_entropy(logits, targets)

    def _layout(self, rng: random.Random) -> str:
        return rng.choice(self.cfg.layouts) if self.cfg.stage == "qa" else "regen"

    def _texts(self, layout: str, sample: Any) -> tuple[str, str, str]:
        """(prefix, after-context text, target) for a sample in a layout."""
        if layout == "regen":
            return "", REGEN_CUE, self.tok.decode(sample.ids) + (self.tok.eos_token or "")
        p = qa_prompt(layout, sample.question, self.tok)
        return p.before, p.after, p.target(sample.answer)

    # ---------------- forward
    def forward(self, samples: list[Any], seed: int) -> tuple[torch.Tensor, dict[str, float]]:
        rng = random.Random(seed)
        cfg = self.cfg
        dev = self.base.device
        B = len(samples)
        layout = self._layout(rng)
        n = 1
        if cfg.stage == "qa" and cfg.max_chunks > 1 and B > 1:
            n = rng.randint(1, min(cfg.max_chunks, B))
        # chunk arrangement: each row has its own context plus n-1 others, in random order
        arrange = []
        for i in range(B):
            others = [j for j in range(B) if j != i and samples[j].ids != samples[i].ids]
            row = [i] + rng.sample(others, min(n - 1, len(others)))
            while len(row) < n:
                row.append(i)
            rng.shuffle(row)
            arrange.append(row)
        prefix, _, _ = self._texts(layout, samples[0])
        afters, targets = [], []
        for s in samples:
            _, after, target = self._texts(layout, s)
            a_ids = self._ids(after)
            t_ids = self._ids(target)[: cfg.max_target_tokens]
            afters.append(a_ids)
            targets.append(t_ids)
        if cfg.mode == "full-tuned":
            return self._forward_full(samples, arrange, prefix, afters, targets)
        gap = 0 if rng.random() < 0.5 or cfg.max_gap <= 0 else rng.randint(1, cfg.max_gap)
        P, pkv = self.prefix_kv(prefix)
        enc = self.compressor.encode_ids([s.ids for s in samples])
        k = self.compressor.k
        idx = torch.tensor(arrange, device=dev)  # (B, n)
        S = max(len(a) + len(t) for a, t in zip(afters, targets))
        pad = self.tok.pad_token_id or 0
        ids = torch.full((B, S), pad, dtype=torch.long, device=dev)
        sel = torch.zeros(B, S, dtype=torch.bool, device=dev)
        tgt = torch.full((B, S), -100, dtype=torch.long, device=dev)
        lens = []
        for b, (a, t) in enumerate(zip(afters, targets)):
            row = a + t
            ids[b, : len(row)] = torch.tensor(row, device=dev)
            # hidden state at position p predicts token p+1
            sel[b, len(a) - 1: len(a) - 1 + len(t)] = True
            tgt[b, len(a) - 1: len(a) - 1 + len(t)] = torch.tensor(t, device=dev)
            lens.append(len(row))
        start = P + gap
        slots = n * k
        with self.compressor.decoder() as lm:
            body = inner_model(lm)
            if self.compressor.mode == "kv":
                K = enc["keys"][idx]  # (B, n, L, H, k, D)
                V = enc["values"][idx]
                Bn, _, L, H, _, D = K.shape
                K = K.permute(0, 2, 3, 1, 4, 5).reshape(B, L, H, slots, D)
                V = V.permute(0, 2, 3, 1, 4, 5).reshape(B, L, H, slots, D)
                K = self.rotary.rotate(K, torch.arange(start, start + slots, device=dev))
                kv = []
                for layer in range(L):
                    kl, vl = K[:, layer], V[:, layer]
                    if P:
                        pk, pv = pkv[layer]
                        kl = torch.cat([pk.expand(B, -1, -1, -1).to(kl.dtype), kl], dim=2)
                        vl = torch.cat([pv.expand(B, -1, -1, -1).to(vl.dtype), vl], dim=2)
                    kv.append((kl, vl))
                cache = new_cache(lm.config, kv)
                mask = torch.ones(B, P + slots + S, dtype=torch.long, device=dev)
                for b, ln in enumerate(lens):
                    mask[b, P + slots + ln:] = 0
                pos = torch.arange(start + slots, start + slots + S, device=dev)[None].expand(B, -1)
                out = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **cache_kwargs(body, cache))
                hidden = out.last_hidden_state
                loss = self._loss_from_hidden(lm, hidden, sel, tgt[sel])
            else:
                E = enc["embeddings"][idx].reshape(B, slots, -1)  # (B, n*k, hidden)
                tok_emb = lm.get_input_embeddings()(ids)
                inputs = torch.cat([E.to(tok_emb.dtype), tok_emb], dim=1)
                cache = new_cache(lm.config, [(pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1)) for pk, pv in pkv]) if P else new_cache(lm.config)
                mask = torch.ones(B, P + slots + S, dtype=torch.long, device=dev)
                for b, ln in enumerate(lens):
                    mask[b, P + slots + ln:] = 0
                pos = torch.arange(start, start + slots + S, device=dev)[None].expand(B, -1)
                out = body(inputs_embeds=inputs, attention_mask=mask, position_ids=pos, use_cache=True, **cache_kwargs(body, cache))
                hidden = out.last_hidden_state[:, slots:]
                loss = self._loss_from_hidden(lm, hidden, sel, tgt[sel])
        enc_tokens = sum(len(s.ids) + k for s in samples)
        dec_tokens = B * (P + slots) + sum(lens)
        return loss, {"layout": layout, "chunks": n, "enc_tokens": enc_tokens, "dec_tokens": dec_tokens,
                      "target_tokens": int(sel.sum())}

    def _forward_full(self, samples: list[Any], arrange: list[list[int]], prefix: str, afters: list[list[int]],
                      targets: list[list[int]]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Full-text reference: one LoRA-adapted forward over prefix + context texts + question + answer."""
        dev = self.base.device
        pre = with_bos(self.tok, self._ids(prefix))
        sep = self._ids("\n")
        rows, sels = [], []
        for b, row in enumerate(arrange):
            ctx: list[int] = []
            for j, c in enumerate(row):
                ctx += (sep if j else []) + samples[c].ids
            seq = pre + ctx + afters[b]
            rows.append((seq, targets[b]))
        S = max(len(a) + len(t) for a, t in rows)
        B = len(rows)
        pad = self.tok.pad_token_id or 0
        ids = torch.full((B, S), pad, dtype=torch.long, device=dev)
        mask = torch.zeros(B, S, dtype=torch.long, device=dev)
        sel = torch.zeros(B, S, dtype=torch.bool, device=dev)
        tgt = torch.full((B, S), -100, dtype=torch.long, device=dev)
        for b, (a, t) in enumerate(rows):
            ids[b, : len(a) + len(t)] = torch.tensor(a + t, device=dev)
            mask[b, : len(a) + len(t)] = 1
            sel[b, len(a) - 1: len(a) - 1 + len(t)] = True
            tgt[b, len(a) - 1: len(a) - 1 + len(t)] = torch.tensor(t, device=dev)
        lm = causal_lm(self.peft_model)
        out = inner_model(self.peft_model)(input_ids=ids, attention_mask=mask, use_cache=False)
        loss = self._loss_from_hidden(lm, out.last_hidden_state, sel, tgt[sel])
        return loss, {"layout": "full", "chunks": len(arrange[0]), "enc_tokens": 0, "dec_tokens": int(mask.sum()),
                      "target_tokens": int(sel.sum())}


# ---------------------------------------------------------------------------------------------
def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Constant learning rate after a linear warm-up (the paper's schedule)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def build_compressor(base: BaseModel, cfg: TrainConfig) -> Compressor:
    """The compressor a run trains: from ``cfg.init`` or fresh, on the base's device, trainable weights fp32."""
    init_dir = resolve_checkpoint(cfg.init) if cfg.init else None
    if init_dir is not None:
        compressor = Compressor.from_pretrained(init_dir, base=base)
        if compressor.mode != cfg.mode or compressor.k != cfg.k:
            raise ValueError(f"--init checkpoint is {compressor.mode} k={compressor.k}, not {cfg.mode} k={cfg.k}")
    else:
        ccfg = CompressorConfig(k=cfg.k, mode=cfg.mode, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                lora_dropout=cfg.lora_dropout, target_modules=list(cfg.target_modules),
                                max_length=max(cfg.max_tokens, 512))
        compressor = Compressor(base, ccfg, seed=cfg.seed)
    compressor.to(base.device)
    compressor.mark_trainable()
    # trainable weights in fp32 (the frozen base may be bf16)
    for p in compressor.trainable_parameters():
        p.data = p.data.float()
    return compressor


def train_step(model: nn.Module, samples: list[Any], seed: int, opt: torch.optim.Optimizer,
               params: list[nn.Parameter], autocast: Any) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
    """One optimisation step: loss of the batch (under ``autocast``), backward, clip at 1.0, update.

    Returns the loss (detached), the step module's info dict and the gradient norm before clipping.
    """
    with autocast:
        loss, info = model(samples, seed=seed)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.detach(), info, gnorm


def enable_mlp_checkpointing(model: Any) -> int:
    """Recompute every decoder layer's MLP in the backward pass instead of keeping its activations.

    Whole-layer gradient checkpointing (``gradient_checkpointing_enable``) is not usable here:
    transformers drops the K/V cache inside checkpointed layers, and the decoder pass reads the
    compressed chunks from that cache. The MLP blocks hold most of a layer's activations
    (three ``intermediate_size`` tensors per token) and never touch the cache, so recomputing
    them is safe. Returns the number of MLP blocks wrapped; calling it twice wraps nothing new.
    """
    from torch.utils.checkpoint import checkpoint

    n = 0
    for layer in inner_model(model).layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is None or getattr(mlp, "_compressor_plugin_ckpt", False):
            continue
        plain = mlp.forward

        def forward(*args: Any, _plain: Any = plain, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        mlp.forward = forward
        mlp._compressor_plugin_ckpt = True
        n += 1
    return n


def train(cfg: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a training run; returns the final summary.

    Writes to ``cfg.output``: ``checkpoint/`` (latest compressor or adapter), ``best/`` (lowest
    validation loss), ``state.pt`` (optimizer and step, for resuming), ``log.jsonl``,
    ``train_config.json`` and ``curves.png``.
    """
    rank, world, local = _dist_info()
    if world > 1:
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
    device = cfg.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + rank)
    base = load_base_model(cfg.base, device=dev)
    tok = base.tokenizer

    compressor = None
    peft_model = None
    if cfg.mode == "full-tuned":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(base.model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                           lora_dropout=cfg.lora_dropout,
                                                           target_modules=list(cfg.target_modules), bias="none"))
        for n_, p in peft_model.named_parameters():
            p.requires_grad_("lora_" in n_)
        params = [p for p in peft_model.parameters() if p.requires_grad]
    else:
        compressor = build_compressor(base, cfg)
        params = compressor.trainable_parameters()
    if cfg.gradient_checkpointing:
        enable_mlp_checkpointing(base.model)
    step_module = StepModule(base, cfg, compressor, peft_model)
    model_for_train: nn.Module = step_module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model_for_train = DDP(step_module, device_ids=[dev.index] if dev.type == "cuda" else None,
                              find_unused_parameters=True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    # ---- data
    t_load = time.time()
    if cfg.stage == "regen":
        train_set: Sequence[Any] = load_regen(cfg.data, tok, max_tokens=min(cfg.max_tokens, cfg.max_target_tokens), limit=cfg.limit)
        val_set: Sequence[Any] = load_regen(cfg.val_data, tok, max_tokens=min(cfg.max_tokens, cfg.max_target_tokens),
                                            limit=cfg.val_samples) if cfg.val_data else []
    else:
        train_set = load_qa(cfg.data, tok, max_tokens=cfg.max_tokens, limit=cfg.limit)
        val_set = load_qa(cfg.val_data, tok, max_tokens=cfg.max_tokens, limit=cfg.val_samples * 4)[: cfg.val_samples] if cfg.val_data else []
    if not train_set:
        raise ValueError("no usable training samples in the data files")
    logger.info("loaded %d training samples in %.1fs", len(train_set), time.time() - t_load)

    # ---- resume
    step = 0
    state_path = out / "state.pt"
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        _load_trainable(compressor, peft_model, out / "checkpoint")
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        logger.info("resumed from step %d", step)
    best = float("inf")
    best_path = out / "best" / "val.json"
    if best_path.is_file():
        best = json.loads(best_path.read_text())["val_loss"]
    if rank == 0:
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    log = open(out / "log.jsonl", "a") if rank == 0 else None

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    stream = batch_stream(train_set, cfg.batch_size, seed=cfg.seed, start_step=step, rank=rank, world=world)
    t0 = time.time()
    window = {"t": time.time(), "samples": 0, "tokens": 0, "loss": 0.0, "n": 0}
    n_params = sum(p.numel() for p in base.model.parameters())
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {cfg.stage} {cfg.mode} k={cfg.k}", unit="step")
    model_for_train.train()
    summary: dict[str, Any] = {}
    stop_reason = "max_steps"
    while True:
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
        if cfg.max_minutes is not None and (time.time() - t0) / 60 >= cfg.max_minutes:
            stop_reason = "max_minutes"
            break
        epoch, batch_idx = next(stream)
        samples = [train_set[i] for i in batch_idx]
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        loss, info, gnorm = train_step(model_for_train, samples, cfg.seed * 1_000_003 + step * world + rank,
                                       opt, params, autocast)
        if compressor is not None:
            compressor.invalidate_fingerprint()
        step += 1
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"non-finite loss at step {step}")
        window["samples"] += len(samples) * world
        window["tokens"] += (info["enc_tokens"] + info["dec_tokens"]) * world
        window["loss"] += lv
        window["n"] += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{lv:.3f}")
        if rank == 0 and step % cfg.log_every == 0:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - window["t"]
            rec = {"step": step, "epoch": epoch, "loss": window["loss"] / window["n"], "lr": _lr_at(step, cfg),
                   "grad_norm": float(gnorm), "samples_per_s": window["samples"] / dt,
                   "tokens_per_s": window["tokens"] / dt,
                   "tflops": 6 * n_params * window["tokens"] / dt / 1e12,
                   "elapsed_min": (time.time() - t0) / 60, "samples_seen": step * cfg.batch_size * world}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            window = {"t": time.time(), "samples": 0, "tokens": 0, "loss": 0.0, "n": 0}
        if rank == 0 and val_set and step % cfg.eval_every == 0:
            vl = validate(step_module, val_set, cfg, autocast)
            log.write(json.dumps({"step": step, "val_loss": vl, "elapsed_min": (time.time() - t0) / 60}) + "\n")
            log.flush()
            if vl < best:
                best = vl
                _save(compressor, peft_model, out / "best", cfg, step)
                best_path.write_text(json.dumps({"val_loss": vl, "step": step}) + "\n")
        if rank == 0 and step % cfg.save_every == 0:
            _save_state(compressor, peft_model, opt, out, cfg, step)
    if bar is not None:
        bar.close()
    if rank == 0:
        vl = validate(step_module, val_set, cfg, autocast) if val_set else None
        if vl is not None:
            log.write(json.dumps({"step": step, "val_loss": vl, "elapsed_min": (time.time() - t0) / 60}) + "\n")
            if vl < best:
                best = vl
                _save(compressor, peft_model, out / "best", cfg, step)
                best_path.write_text(json.dumps({"val_loss": vl, "step": step}) + "\n")
        _save_state(compressor, peft_model, opt, out, cfg, step)
        log.close()
        summary = {"step": step, "stop": stop_reason, "minutes": (time.time() - t0) / 60, "val_loss": vl,
                   "best_val_loss": None if best == float("inf") else best, "train_samples": len(train_set),
                   "output": str(out)}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        try:
            from .plots import plot_log

            plot_log(out / "log.jsonl", out / "curves.png")
        except Exception as exc:  # plotting is optional
            logger.warning("could not plot curves: %s", exc)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return summary


@torch.no_grad()
def validate(module: StepModule, val_set: Sequence[Any], cfg: TrainConfig, autocast: Any) -> float:
    """Mean loss over the validation samples, every layout in turn (deterministic)."""
    was = module.training
    module.eval()
    losses = []
    bs = cfg.batch_size
    for s in range(0, len(val_set), bs):
        batch = list(val_set[s:s + bs])
        if not batch:
            continue
        with autocast:
            loss, _ = module(batch, seed=12345 + s)
        losses.append(float(loss))
    module.train(was)
    return sum(losses) / max(len(losses), 1)


def _save(compressor: Compressor | None, peft_model: Any, path: Path, cfg: TrainConfig, step: int) -> None:
    info = {"stage": cfg.stage, "step": step, "samples_seen": step * cfg.batch_size, "layouts": cfg.layouts,
            "data": [Path(d).name for d in cfg.data]}
    if compressor is not None:
        compressor.save_pretrained(path, extra=info)
    else:
        peft_model.save_pretrained(str(path))
        (path / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")


def _save_state(compressor: Compressor | None, peft_model: Any, opt: Any, out: Path, cfg: TrainConfig, step: int) -> None:
    # fp32 weights for exact resumption; the shipped copy is converted to bf16 separately
    if compressor is not None:
        compressor.save_pretrained(out / "checkpoint", dtype=torch.float32,
                                   extra={"stage": cfg.stage, "step": step, "layouts": cfg.layouts})
    else:
        peft_model.save_pretrained(str(out / "checkpoint"))
    tmp = out / "state.pt.tmp"
    torch.save({"optimizer": opt.state_dict(), "step": step}, tmp)
    os.replace(tmp, out / "state.pt")


def _load_trainable(compressor: Compressor | None, peft_model: Any, path: Path) -> None:
    if compressor is not None:
        compressor.load_weights(path)
        for p in compressor.trainable_parameters():
            p.data = p.data.float()
    else:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(peft_model, load_file(str(path / "adapter_model.safetensors")))
