"""Training loop: regeneration pretraining and QA fine-tuning of a compressor.

Only the LoRA adapter and the memory embeddings train; the decoder is the unchanged base model
(adapter disabled). Every step lays samples out as the LLM wrappers do at answer time:

    [layout prefix text][chunk 1 .. chunk n, compressed, back to back][question / cue][target]

with 1..n chunks in random order (the others are other samples' contexts from the same batch,
compressed once per step), an optional random position gap before the chunks, and the three
QA layouts (``plain``, ``fewshot``, ``chat``). Keys are stored position-free and rotated to the
slots they occupy, exactly as :class:`~compressor_plugin.generation.Generator` does. With
``anchors`` (``--anchors N``), each chunk of a QA step is followed by its question anchors, as
the engine lays them out at answer time: ``[slots 1][anchors 1][slots 2][anchors 2]...``.

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
import stat
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from ..compressor import Compressor, CompressorConfig, read_checked_tensors, resolve_checkpoint
from ..errors import TrainingStateError
from ..context import RotaryHelper
from ..hf_compat import cache_kwargs, causal_lm, inner_model, new_cache
from ..models import BaseModel, load_base_model, with_bos
from ..prompts import QA_LAYOUTS, REGEN_CUE, qa_prompt
from .data import QASample, RegenSample, batch_stream, load_mix, load_qa, load_regen

logger = logging.getLogger(__name__)


#: Step tasks: regeneration, continuation, question answering.
TASKS = ("regen", "continue", "qa", "cloze")
#: The highest step a run without ``max_steps`` resumes at (a bound for a step read from ``state.pt``).
MAX_RESUME_STEPS = 10_000_000
#: The per-parameter state AdamW keeps.
_ADAMW_STATE = {"step", "exp_avg", "exp_avg_sq"}


def parse_mix(text: str) -> dict[str, float]:
    """``"regen=0.2,continue=0.3,qa=0.5"`` -> ``{"regen": 0.2, "continue": 0.3, "qa": 0.5}``.

    ``cloze`` gives the cloze questions (``cloze_per_text``) steps of their own; without it they
    join the ``qa`` pool (and then outnumber the QA files' questions on a large corpus).
    """
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, w = part.partition("=")
        if name not in TASKS or not w:
            raise ValueError(f"bad mix entry {part!r}: use TASK=WEIGHT with TASK in {TASKS}")
        out[name] = float(w)
    return out


def task_of(cfg: "TrainConfig", step: int) -> str:
    """The task of a training step (seeded by step, so a resumed run repeats the same schedule)."""
    if cfg.stage != "mix":
        return cfg.stage
    names = [t for t in TASKS if cfg.mix.get(t, 0) > 0]
    return random.Random(cfg.seed * 7919 + step).choices(names, [cfg.mix[t] for t in names])[0]


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``train_config.json``)."""

    stage: str = "regen"  # "regen", "qa" or "mix" (regeneration, continuation and QA steps in one run)
    mode: str = "kv"  # "kv", "embedding" or "full-tuned"
    k: int = 16
    data: list[str] = field(default_factory=list)
    val_data: list[str] = field(default_factory=list)
    output: str = "runs/compressor"
    base: str = "default"
    init: str | None = None  # checkpoint to start from (e.g. the regen stage's output)
    lr: float = 1e-4
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # after the warm-up: "constant" (the paper's) or "cosine" (down to min_lr_ratio * lr at max_steps)
    min_lr_ratio: float = 0.1
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
    # "mix" stage: share of steps per task (regen = repeat the text, continue = write the text that
    # follows the compressed part, qa = answer a question: QA files plus cloze questions)
    mix: dict[str, float] = field(default_factory=lambda: {"regen": 0.2, "continue": 0.3, "qa": 0.5})
    continue_tokens: int = 128  # continuation target length
    cloze_per_text: int = 0  # cloze (detail) questions generated per corpus text, added to the QA pool
    verify_share: float = 0.0  # share of those detail questions asked as yes/no checks instead
    distill: float = 0.0  # QA steps: weight of KL(full-text teacher || student) vs. CE on the gold answer
    continue_distill: float = 0.0  # continuation steps: weight of KL(full-text teacher || student) vs. CE on the text
    teacher_targets: float = 0.0  # QA steps: share of samples whose target is the teacher's own answer
    anchors: int = 0  # QA steps: up to this many question-anchor tokens per chunk after its slots, as at answer time
    window_share: float = 0.0  # share of those anchors the question's best sentence may take verbatim (anchors.py)
    anchor_workers: int = 0  # processes that choose a step's new anchors (0: the training process itself)
    gradient_checkpointing: bool = False  # recompute the frozen MLP blocks in the backward pass
    fused_kernels: bool = False  # Liger's Triton RMSNorm / rotary / SwiGLU (CUDA, training/kernels.py)

    def __post_init__(self) -> None:
        if self.stage not in ("regen", "qa", "mix"):
            raise ValueError("stage must be 'regen', 'qa' or 'mix'")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', not {self.lr_schedule!r}")
        if self.lr_schedule == "cosine" and not self.max_steps:
            raise ValueError("a cosine learning rate decays to max_steps: give max_steps (--max-steps)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio is a share of lr between 0 and 1, not {self.min_lr_ratio!r}")
        unknown = set(self.mix) - set(TASKS)
        if unknown or not self.mix or any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ValueError(f"mix needs non-negative weights for tasks {TASKS}, got {self.mix}")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError("distill is a weight between 0 and 1")
        if not 0.0 <= self.continue_distill <= 1.0:
            raise ValueError("continue_distill is a weight between 0 and 1")
        if self.continue_distill > 0 and (self.stage != "mix" or self.mix.get("continue", 0) <= 0):
            raise ValueError("continue_distill weighs the loss of continuation steps: use --stage mix with a "
                             "continue share in --mix")
        if not 0.0 <= self.teacher_targets <= 1.0:
            raise ValueError("teacher_targets is a share between 0 and 1")
        if not 0.0 <= self.verify_share <= 1.0:
            raise ValueError("verify_share is a share between 0 and 1")
        if self.teacher_targets > 0 and self.mode == "full-tuned":
            raise ValueError("teacher targets train compressors; the full-tuned reference reads the text itself")
        from ..anchors import check_budget, check_window_share

        self.anchors = check_budget(self.anchors)
        self.window_share = check_window_share(self.window_share)
        if isinstance(self.anchor_workers, bool) or not isinstance(self.anchor_workers, int) or self.anchor_workers < 0:
            raise ValueError(f"anchor_workers must be an integer >= 0, not {self.anchor_workers!r}")
        if self.anchors and self.mode == "full-tuned":
            raise ValueError("anchors train compressors; the full-tuned reference reads the text itself")
        if self.distill > 0 and self.mode == "full-tuned":
            raise ValueError("distillation trains compressors; the full-tuned reference reads the text itself")
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

def _to_device(data: Any, dev: torch.device) -> torch.Tensor:
    """A long tensor of host data on ``dev``, copied without waiting for the work queued there
    (``torch.tensor(data, device=...)`` waits for it: a sync per call in a training step)."""
    return torch.tensor(data, dtype=torch.long).to(dev, non_blocking=True)


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
        self._eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        self._chunk_texts: dict[str, str] = {}  # context -> its text as compressed
        self._anchor_spans: dict[str, list] = {}  # context -> its candidate anchor spans
        self._anchor_ids: dict[tuple[str, str, int], list[int]] = {}  # (context, question, budget) -> anchor ids
        self.anchor_pool: Any = None  # an AnchorPool that chooses new anchors (train() starts one for cfg.anchor_workers)

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

    def _logits(self, lm: Any, h: torch.Tensor) -> torch.Tensor:
        return lm.lm_head(h).float()

    def _ce(self, lm: Any, h: torch.Tensor, targets: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Mean cross-entropy of ``lm_head(h)`` against ``targets``.

        Long target sets (regeneration of 128 texts x 192 tokens = 25k rows x 49k vocabulary) are
        done in checkpointed chunks, so the fp32 logits are never all alive at once.
        """
        n = h.shape[0]
        if n <= chunk:
            return nn.functional.cross_entropy(self._logits(lm, h), targets)
        w = lm.lm_head.weight
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, n, chunk):
            total = total + torch.utils.checkpoint.checkpoint(_ce_sum, w, h[i:i + chunk], targets[i:i + chunk],
                                                              use_reentrant=False)
        return total / n

    def _chunk_anchors(self, sample: Any, question: str, budget: int) -> list[int]:
        """Anchor ids of ``sample``'s chunk (its text as compressed) for ``question`` within ``budget``.

        Deterministic, so kept per (context, question, budget): a question asked again in a
        later epoch costs nothing.
        """
        from ..anchors import anchor_spans, select_anchors

        key = (sample.context, question, budget)
        if key not in self._anchor_ids:
            text = self._chunk_text(sample)
            if sample.context not in self._anchor_spans:
                self._anchor_spans[sample.context] = anchor_spans(text, self.tok)
            self._anchor_ids[key] = select_anchors(text, self.tok, budget, question=question,
                                                   spans=self._anchor_spans[sample.context],
                                                   window_share=self.cfg.window_share)
        return self._anchor_ids[key]

    def _chunk_text(self, sample: Any) -> str:
        """A chunk's text as compressed (its ids decoded; kept per context)."""
        if sample.context not in self._chunk_texts:
            self._chunk_texts[sample.context] = self.tok.decode(sample.ids)
        return self._chunk_texts[sample.context]

    def _row_budgets(self, samples: list[Any], row: list[int], question: str) -> list[int]:
        """Each chunk's share of the prompt's anchor budget (``cfg.anchors`` per chunk), by relevance
        to the question (:func:`~compressor_plugin.anchors.share_budget`)."""
        from ..anchors import relevance, share_budget

        return share_budget([relevance(self._chunk_text(samples[c]), question) for c in row], self.cfg.anchors)

    def _row_anchors(self, samples: list[Any], row: list[int], question: str,
                     budgets: list[int] | None = None) -> list[list[int]]:
        """Question anchors of each chunk of one prompt, as the engine chooses them.

        The prompt's budget is shared by relevance (:meth:`_row_budgets`, unless ``budgets`` gives
        the shares already), then each chunk's spans are chosen within its share
        (:func:`~compressor_plugin.anchors.question_anchors` does the same).
        """
        budgets = self._row_budgets(samples, row, question) if budgets is None else budgets
        return [self._chunk_anchors(samples[c], question, b) for c, b in zip(row, budgets)]

    def _choose_anchors_in_pool(self, samples: list[Any], arrange: list[list[int]], budgets: list[list[int]]) -> None:
        """Choose the anchors this step needs and has not met before in :attr:`anchor_pool`'s
        workers, all at once (the same ids :meth:`_chunk_anchors` gives, on more cores);
        ``budgets``: each row's shares (:meth:`_row_budgets`)."""
        todo: dict[tuple[str, str, int], tuple[str, str, int]] = {}
        for b, row in enumerate(arrange):
            question = samples[b].question
            for c, budget in zip(row, budgets[b]):
                key = (samples[c].context, question, budget)
                if key not in self._anchor_ids and key not in todo:
                    todo[key] = (self._chunk_text(samples[c]), question, budget)
        if todo:
            chosen = self.anchor_pool.question_anchors(list(todo.values()), window_share=self.cfg.window_share)
            self._anchor_ids.update(zip(todo, chosen))

    def _layout(self, rng: random.Random, task: str) -> str:
        return rng.choice(self.cfg.layouts) if task == "qa" else task

    def _row(self, task: str, layout: str, sample: Any, rng: random.Random) -> tuple[list[int], list[int], list[int]]:
        """(ids to compress, ids after the chunks, target ids) of one sample for a task."""
        cfg = self.cfg
        if task == "regen":
            return sample.ids, self._ids(REGEN_CUE), (sample.ids + self._eos)[: cfg.max_target_tokens]
        if task == "continue":
            # compress the first part of the text; the decoder writes what follows. The first
            # following token is given (not supervised) so every row has a query position.
            ids = sample.ids
            lo = max(4, len(ids) // 3)
            cut = rng.randint(lo, max(lo, 2 * len(ids) // 3))
            rest = ids[cut:cut + 1 + cfg.continue_tokens]
            return ids[:cut], rest[:1], rest[1:]
        p = qa_prompt(layout, sample.question, self.tok)
        answer = sample.answer
        if sample.teacher and cfg.teacher_targets > 0 and rng.random() < cfg.teacher_targets:
            answer = sample.teacher
        return sample.ids, self._ids(p.after), self._ids(p.target(answer))[: cfg.max_target_tokens]

    @staticmethod
    def _arrange(samples: list[Any], n: int, rng: random.Random) -> list[list[int]]:
        """Chunk order per row: its own context plus ``n - 1`` other contexts of the batch, shuffled."""
        B = len(samples)
        keys = [hash(tuple(s.ids)) for s in samples]
        distinct = len(set(keys))
        arrange = []
        for i in range(B):
            want = min(n - 1, distinct - 1)  # other contexts with different text exist for this many
            row, seen = [i], {keys[i]}
            while len(row) - 1 < want:  # rejection sampling: O(n) per row instead of O(B)
                j = rng.randrange(B)
                if keys[j] not in seen:
                    seen.add(keys[j])
                    row.append(j)
            while len(row) < n:
                row.append(i)
            rng.shuffle(row)
            arrange.append(row)
        return arrange

    @staticmethod
    def _pack(rows: list[tuple[list[int], list[int]]], pad: int, dev: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """Right-padded (ids, sel, targets) for rows of (input ids, target ids); built on the host,
        moved in one copy each. ``sel`` holds the (row, position) index pairs whose next token is a
        target, in row order: ``hidden[sel]`` picks them without the device sync a boolean mask costs."""
        B, S = len(rows), max(len(a) + len(t) for a, t in rows)
        ids = torch.full((B, S), pad, dtype=torch.long)
        tgt = torch.full((B, S), -100, dtype=torch.long)
        rows_at: list[int] = []
        at: list[int] = []
        lens = []
        for b, (a, t) in enumerate(rows):
            ids[b, : len(a) + len(t)] = torch.tensor(a + t, dtype=torch.long)
            # hidden state at position p predicts token p+1
            rows_at += [b] * len(t)
            at += range(len(a) - 1, len(a) - 1 + len(t))
            tgt[b, len(a) - 1: len(a) - 1 + len(t)] = torch.tensor(t, dtype=torch.long)
            lens.append(len(a) + len(t))
        sel = (_to_device(rows_at, dev), _to_device(at, dev))
        return ids.to(dev, non_blocking=True), sel, tgt.to(dev, non_blocking=True), lens

    def _full_rows(self, prefix: str, ctx_ids: list[list[int]], arrange: list[list[int]], afters: list[list[int]],
                   targets: list[list[int]]) -> list[tuple[list[int], list[int]]]:
        """Rows of the full-text layout: prefix, the row's contexts as text (newline-separated), after, target."""
        pre, sep = with_bos(self.tok, self._ids(prefix)), self._ids("\n")
        rows = []
        for b, row in enumerate(arrange):
            ctx: list[int] = []
            for j, c in enumerate(row):
                ctx += (sep if j else []) + ctx_ids[c]
            rows.append((pre + ctx + afters[b], targets[b]))
        return rows

    @torch.no_grad()
    def _teacher_hidden(self, rows: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """Last hidden states of the frozen model reading the full text, at every target position
        (logits are made chunk by chunk in :meth:`_kl_ce`)."""
        dev = self.base.device
        ids, sel, _, lens = self._pack(rows, self.tok.pad_token_id or 0, dev)
        mask = (torch.arange(ids.shape[1], device=dev)[None] < _to_device(lens, dev)[:, None]).long()
        with self.compressor.decoder() as lm:
            out = inner_model(lm)(input_ids=ids, attention_mask=mask, use_cache=False)
            return out.last_hidden_state[sel]

    def _kl_ce(self, lm: Any, h: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
               chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean KL(teacher || student) and mean CE on ``targets`` over target positions, from the
        student's and the teacher's hidden states. Long target sets (continuations: 256 rows x 128
        tokens) go in checkpointed chunks, so no two full fp32 logit tables are alive at once."""
        w, n = lm.lm_head.weight, h.shape[0]
        if n <= chunk:
            sums = _kl_ce_sums(w, h, teacher, targets)
        else:
            sums = sum(torch.utils.checkpoint.checkpoint(_kl_ce_sums, w, h[i:i + chunk], teacher[i:i + chunk],
                                                         targets[i:i + chunk], use_reentrant=False)
                       for i in range(0, n, chunk))
        return sums[0] / n, sums[1] / n

    # ---------------- forward
    def forward(self, samples: list[Any], seed: int, task: str | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        rng = random.Random(seed)
        cfg = self.cfg
        dev = self.base.device
        task = task or ("qa" if cfg.stage == "qa" else "regen")
        kind = "qa" if task == "cloze" else task  # cloze steps are QA steps on cloze questions
        B = len(samples)
        layout = self._layout(rng, kind)
        n = 1
        if kind == "qa" and cfg.max_chunks > 1 and B > 1:
            n = rng.randint(1, min(cfg.max_chunks, B))
        arrange = self._arrange(samples, n, rng) if n > 1 else [[i] for i in range(B)]
        prefix = "" if kind != "qa" else qa_prompt(layout, samples[0].question, self.tok).before
        enc_ids, afters, targets = [], [], []
        for s in samples:
            e, a, t = self._row(kind, layout, s, rng)
            enc_ids.append(e)
            afters.append(a)
            targets.append(t)
        if cfg.mode == "full-tuned":
            return self._forward_full(prefix, enc_ids, arrange, afters, targets)
        # the student reads each chunk's question anchors right after its slots, as the engine lays
        # them out (the embedding mode: one-chunk prompts only); the full-text teacher reads the text
        anchored = kind == "qa" and cfg.anchors > 0 and (n == 1 or cfg.mode == "kv")
        anchors = None
        if anchored:
            budgets = [self._row_budgets(samples, row, samples[b].question) for b, row in enumerate(arrange)]
            if self.anchor_pool is not None:
                self._choose_anchors_in_pool(samples, arrange, budgets)
            anchors = [self._row_anchors(samples, row, samples[b].question, budgets[b]) for b, row in enumerate(arrange)]
        # one chunk: its anchors simply precede the question; several: each chunk's anchors follow
        # its own slots (the interleaved layout below), and the inputs hold them in prompt order
        reads = [sum(a, []) + after for a, after in zip(anchors, afters)] if anchors else afters
        gap = 0 if rng.random() < 0.5 or cfg.max_gap <= 0 else rng.randint(1, cfg.max_gap)
        P, pkv = self.prefix_kv(prefix)
        enc = self.compressor.encode_ids(enc_ids)
        k = self.compressor.k
        idx = _to_device(arrange, dev)  # (B, n)
        ids, sel, tgt, lens = self._pack([(a, t) for a, t in zip(reads, targets)], self.tok.pad_token_id or 0, dev)
        S = ids.shape[1]
        start = P + gap
        slots = n * k
        # padding follows each row's tokens: hide it from nothing we read (causal), but mask it anyway
        # for the embedding mode's full-length attention rows
        mask = torch.cat([torch.ones(B, P + slots, dtype=torch.long, device=dev),
                          (torch.arange(S, device=dev)[None] < _to_device(lens, dev)[:, None]).long()], 1)
        with self.compressor.decoder() as lm:
            body = inner_model(lm)
            if self.compressor.mode == "kv" and anchors is not None and n > 1:
                hidden = self._interleaved(body, lm, enc, idx, anchors, ids, lens, P, pkv, start)
            elif self.compressor.mode == "kv":
                cache = self._slot_cache(lm, enc, idx, torch.arange(start, start + slots, device=dev), P, pkv)
                pos = torch.arange(start + slots, start + slots + S, device=dev)[None].expand(B, -1)
                out = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **cache_kwargs(body, cache))
                hidden = out.last_hidden_state
            else:
                E = enc["embeddings"][idx].reshape(B, slots, -1)  # (B, n*k, hidden)
                tok_emb = lm.get_input_embeddings()(ids)
                inputs = torch.cat([E.to(tok_emb.dtype), tok_emb], dim=1)
                cache = new_cache(lm.config, [(pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1)) for pk, pv in pkv]) if P else new_cache(lm.config)
                pos = torch.arange(start, start + slots + S, device=dev)[None].expand(B, -1)
                out = body(inputs_embeds=inputs, attention_mask=mask, position_ids=pos, use_cache=True, **cache_kwargs(body, cache))
                hidden = out.last_hidden_state[:, slots:]
            h = hidden[sel]
            info: dict[str, Any] = {}
            # distillation: KL to the frozen model reading the text itself, at the same target
            # positions (QA answers, or the continuation of a text); validation: CE only
            weight = {"qa": cfg.distill, "continue": cfg.continue_distill}.get(kind, 0.0) if self.training else 0.0
            if weight > 0:
                teacher = self._teacher_hidden(self._full_rows(prefix, enc_ids, arrange, afters, targets))
                kl, ce = self._kl_ce(lm, h, teacher, tgt[sel])
                loss = (1 - weight) * ce + weight * kl
                info.update(ce=ce.detach(), kl=kl.detach())  # tensors: reading them would wait for the device
            else:
                loss = self._ce(lm, h, tgt[sel])
        enc_tokens = sum(len(e) + k for e in enc_ids)
        dec_tokens = B * (P + slots) + sum(lens)
        info.update(task=task, layout=layout, chunks=n, enc_tokens=enc_tokens, dec_tokens=dec_tokens,
                    target_tokens=sel[0].numel(), anchor_tokens=sum(len(r) - len(a) for r, a in zip(reads, afters)))
        return loss, info

    def _slot_cache(self, lm: Any, enc: dict[str, torch.Tensor], idx: torch.Tensor, positions: torch.Tensor, P: int,
                    pkv: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        """A cache holding the prefix K/V, then each row's chunks (``idx``: (B, n)) back to back, their
        keys rotated to ``positions`` (``(n*k,)`` for every row alike, or ``(B, 1, 1, n*k)``)."""
        K = enc["keys"][idx]  # (B, n, L, H, k, D)
        V = enc["values"][idx]
        B, n, L, H, k, D = K.shape
        K = K.permute(0, 2, 3, 1, 4, 5).reshape(B, L, H, n * k, D)
        V = V.permute(0, 2, 3, 1, 4, 5).reshape(B, L, H, n * k, D)
        K = self.rotary.rotate(K, positions)
        kv = []
        for layer in range(L):
            kl, vl = K[:, layer], V[:, layer]
            if P:
                pk, pv = pkv[layer]
                kl = torch.cat([pk.expand(B, -1, -1, -1).to(kl.dtype), kl], dim=2)
                vl = torch.cat([pv.expand(B, -1, -1, -1).to(vl.dtype), vl], dim=2)
            kv.append((kl, vl))
        return new_cache(lm.config, kv)

    def _interleaved(self, body: Any, lm: Any, enc: dict[str, torch.Tensor], idx: torch.Tensor,
                     anchors: list[list[list[int]]], ids: torch.Tensor, lens: list[int], P: int,
                     pkv: list[tuple[torch.Tensor, torch.Tensor]], start: int) -> torch.Tensor:
        """Hidden states of kv rows laid out with each chunk's anchors after its own slots.

        Row b reads ``[prefix][gap][slots 1][anchors 1][slots 2][anchors 2] ... [question][target]``,
        the layout of :meth:`~compressor_plugin.generation.Generator.prefill`, and is computed the
        same way: the chunks' keys go into the cache first, rotated to the positions they hold in
        that row (which depend on the anchors before them); the inputs (every chunk's anchors in
        prompt order, then the question and target: ``ids``, right-padded to ``lens``) follow,
        and a 4D mask lets each input see the prefix, the slots placed before it and the inputs
        up to itself. A padding input sees only itself.
        """
        from ..generation import MASKED_ATTENTION, _attention_mask

        impl = getattr(lm.config, "_attn_implementation", None) or "eager"
        if impl not in MASKED_ATTENTION:
            raise ValueError(f"anchors between chunks need attention that takes a 4D mask ({', '.join(MASKED_ATTENTION)}), "
                             f"and this model uses {impl!r}")
        dev = ids.device
        B, S = ids.shape
        k, n = self.compressor.k, idx.shape[1]
        slots = n * k
        slot_pos = torch.zeros(B, slots, dtype=torch.long)
        in_pos = torch.zeros(B, S, dtype=torch.long)
        for b, row in enumerate(anchors):
            p, t = start, 0
            for j, a in enumerate(row):
                slot_pos[b, j * k:(j + 1) * k] = torch.arange(p, p + k)
                in_pos[b, t:t + len(a)] = torch.arange(p + k, p + k + len(a))
                p, t = p + k + len(a), t + len(a)
            in_pos[b, t:] = torch.arange(p, p + S - t)  # question, target, then padding
        slot_pos, in_pos = slot_pos.to(dev, non_blocking=True), in_pos.to(dev, non_blocking=True)
        cache = self._slot_cache(lm, enc, idx, slot_pos[:, None, None, :], P, pkv)
        valid = torch.arange(S, device=dev)[None] < _to_device(lens, dev)[:, None]  # (B, S)
        own = torch.eye(S, dtype=torch.bool, device=dev)
        sees_inputs = torch.where(valid[:, :, None], own.cumsum(0).bool()[None] & valid[:, None, :], own[None])
        visible = torch.cat([torch.ones(B, S, P, dtype=torch.bool, device=dev),
                             slot_pos[:, None, :] < in_pos[:, :, None], sees_inputs], dim=2)
        visible[:, :, :P + slots] &= valid[:, :, None]
        mask = _attention_mask(visible[:, None], impl, self.base.dtype)
        out = body(input_ids=ids, attention_mask=mask, position_ids=in_pos, use_cache=True, **cache_kwargs(body, cache))
        return out.last_hidden_state

    def _forward_full(self, prefix: str, ctx_ids: list[list[int]], arrange: list[list[int]], afters: list[list[int]],
                      targets: list[list[int]]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Full-text reference: one LoRA-adapted forward over prefix + context texts + question + answer."""
        dev = self.base.device
        rows = self._full_rows(prefix, ctx_ids, arrange, afters, targets)
        ids, sel, tgt, lens = self._pack(rows, self.tok.pad_token_id or 0, dev)
        mask = (torch.arange(ids.shape[1], device=dev)[None] < _to_device(lens, dev)[:, None]).long()
        lm = causal_lm(self.peft_model)
        out = inner_model(self.peft_model)(input_ids=ids, attention_mask=mask, use_cache=False)
        loss = self._ce(lm, out.last_hidden_state[sel], tgt[sel])
        return loss, {"task": "qa", "layout": "full", "chunks": len(arrange[0]), "enc_tokens": 0,
                      "dec_tokens": sum(lens), "target_tokens": sel[0].numel()}


def _ce_sum(weight: torch.Tensor, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(nn.functional.linear(h, weight).float(), targets, reduction="sum")


def _kl_ce_sums(weight: torch.Tensor, h: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[summed KL(teacher || student), summed CE of the student on ``targets``] over these rows."""
    student = torch.log_softmax(nn.functional.linear(h, weight).float(), dim=-1)
    with torch.no_grad():
        lp = torch.log_softmax(nn.functional.linear(teacher, weight).float(), dim=-1)
    kl = nn.functional.kl_div(student, lp, log_target=True, reduction="sum")
    return torch.stack([kl, nn.functional.nll_loss(student, targets, reduction="sum")])


# ---------------------------------------------------------------------------------------------
def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then a constant rate (the paper's schedule) or a cosine decay that reaches
    ``min_lr_ratio * lr`` at ``max_steps``. A function of the step alone, so a resumed run
    continues the same curve."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant" or not cfg.max_steps:
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    done = min(1.0, (step - cfg.warmup_steps) / span)
    low = cfg.min_lr_ratio * cfg.lr
    return low + (cfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * done))


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


def add_teacher_answers(compressor: Compressor, samples: Sequence[Any], cache_file: Path, *, batch_size: int = 64,
                        max_new_tokens: int = 24, progress: bool = False) -> int:
    """Set ``sample.teacher`` to the frozen model's greedy answer from the full text (sequence-level
    distillation targets), in the best full-text layout (``fewshot``). A sample that already has
    one (a row marked ``"teacher_answer": true``, as ``train-questions --kind written`` writes)
    keeps it.

    Answers are kept in ``cache_file`` (JSON, question + context -> answer), so a resumed run does
    not generate them again. Returns how many answers were generated now.
    """
    import hashlib

    from .questions import full_text_answers

    def key(s: Any) -> str:
        return hashlib.sha256(f"{s.question}\x00{s.context}".encode("utf-8")).hexdigest()

    cached = read_teacher_answers(cache_file) if cache_file.is_file() else {}
    todo = [s for s in samples if s.teacher is None and key(s) not in cached]  # rows that came with one keep it
    if todo:
        answers = full_text_answers(compressor.base, [s.question for s in todo], [s.context for s in todo],
                                    batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
                                    compressor=compressor)
        cached.update((key(s), a) for s, a in zip(todo, answers))
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cached))
        os.replace(tmp, cache_file)
    for s in samples:
        if s.teacher is None:
            s.teacher = cached.get(key(s)) or None
    return len(todo)


def train_step(model: nn.Module, samples: list[Any], seed: int, opt: torch.optim.Optimizer,
               params: list[nn.Parameter], autocast: Any, task: str | None = None
               ) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
    """One optimisation step: loss of the batch for ``task`` (under ``autocast``), backward, clip at 1.0, update.

    Returns the loss (detached), the step module's info dict and the gradient norm before clipping.
    """
    with autocast:
        loss, info = model(samples, seed=seed, task=task)
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
    check_run_folder(out)  # before anything is written there
    best_path = out / "best" / "val.json"
    best = read_best_loss(best_path) if best_path.is_file() else float("inf")
    torch.manual_seed(cfg.seed + rank)
    base = load_base_model(cfg.base, device=dev)
    tok = base.tokenizer
    if "chat" in cfg.layouts and not getattr(tok, "chat_template", None):
        cfg.layouts = [lay for lay in cfg.layouts if lay != "chat"]
        if not cfg.layouts:
            raise ValueError(f"{cfg.base}: the tokenizer has no chat template, so the chat layout cannot be "
                             "trained; pass --layouts plain,fewshot")
        logger.warning("%s has no chat template: training the %s layouts only", cfg.base, ",".join(cfg.layouts))

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
    if cfg.fused_kernels:  # before checkpointing, which wraps whatever MLP forward is in place
        from .kernels import apply_fused_kernels

        apply_fused_kernels(base.model)
    if cfg.gradient_checkpointing:
        enable_mlp_checkpointing(base.model)
    step_module = StepModule(base, cfg, compressor, peft_model)
    if cfg.anchors and cfg.anchor_workers:
        from ..anchors import AnchorPool

        step_module.anchor_pool = AnchorPool(tok, cfg.anchor_workers)
        weakref.finalize(step_module, step_module.anchor_pool.close)  # also when training stops on an error
    model_for_train: nn.Module = step_module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model_for_train = DDP(step_module, device_ids=[dev.index] if dev.type == "cuda" else None,
                              find_unused_parameters=True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    # ---- data
    t_load = time.time()
    regen_cap = min(cfg.max_tokens, cfg.max_target_tokens)
    pools: dict[str, Sequence[Any]]  # training samples per task
    if cfg.stage == "regen":
        pools = {"regen": load_regen(cfg.data, tok, max_tokens=regen_cap, limit=cfg.limit)}
        val_set: Sequence[Any] = load_regen(cfg.val_data, tok, max_tokens=regen_cap,
                                            limit=cfg.val_samples) if cfg.val_data else []
        val_task = "regen"
    elif cfg.stage == "qa":
        pools = {"qa": load_qa(cfg.data, tok, max_tokens=cfg.max_tokens, limit=cfg.limit)}
        val_set = load_qa(cfg.val_data, tok, max_tokens=cfg.max_tokens, limit=cfg.val_samples * 4)[: cfg.val_samples] if cfg.val_data else []
        val_task = "qa"
    else:
        corpus, qa, cloze = load_mix(cfg.data, tok, max_tokens=regen_cap, max_qa_tokens=cfg.max_tokens,
                                     limit=cfg.limit, cloze_per_text=cfg.cloze_per_text, seed=cfg.seed,
                                     verify_share=cfg.verify_share)
        if cfg.mix.get("cloze", 0) <= 0:
            qa, cloze = qa + cloze, []
        pools = {"regen": corpus, "continue": [s_ for s_ in corpus if len(s_.ids) >= 12], "qa": qa, "cloze": cloze}
        missing = [t for t in TASKS if cfg.mix.get(t, 0) > 0 and not pools[t]]
        if missing:
            raise ValueError(f"the mix asks for {missing} steps, but the data files give no samples for them "
                             "(regen/continue need corpus rows with 'text', qa needs QA rows or --cloze-per-text, "
                             "cloze needs --cloze-per-text and corpus rows)")
        val_corpus, val_qa, _ = load_mix(cfg.val_data, tok, max_tokens=regen_cap, max_qa_tokens=cfg.max_tokens,
                                      limit=cfg.val_samples * 4) if cfg.val_data else ([], [], [])
        val_task = "qa" if val_qa else "regen"
        val_set = (val_qa or val_corpus)[: cfg.val_samples]
    pools = {t: p_ for t, p_ in pools.items() if p_}
    if not pools:
        raise ValueError("no usable training samples in the data files")
    if cfg.teacher_targets > 0 and compressor is not None and "qa" in pools:
        # the QA pool only: cloze questions of their own share keep their exact-span answers, which
        # are what the text says (and generating answers for tens of thousands of them is slow)
        add_teacher_answers(compressor, pools["qa"], out / "teacher_answers_qa.json", progress=progress and rank == 0)
    logger.info("loaded %s training samples in %.1fs", {t: len(p_) for t, p_ in pools.items()}, time.time() - t_load)

    # ---- resume
    step = 0
    state_path = out / "state.pt"
    if state_path.is_file():
        opt_state, step = read_resume_state(state_path, opt, cfg.max_steps)
        _load_trainable(compressor, peft_model, out / "checkpoint")
        opt.load_state_dict(opt_state)
        logger.info("resumed from step %d", step)
    if rank == 0:
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    log = open(out / "log.jsonl", "a") if rank == 0 else None

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    # one endless batch stream per task; each starts where this run's earlier steps of that task left off
    done = {t: 0 for t in pools}
    for s_ in range(step):
        done[task_of(cfg, s_)] += 1
    streams = {t: batch_stream(p_, cfg.batch_size, seed=cfg.seed + i, start_step=done[t], rank=rank, world=world)
               for i, (t, p_) in enumerate(pools.items())}
    t0 = time.time()
    window: dict[str, Any] = {"t": time.time(), "samples": 0, "tokens": 0, "loss": 0.0, "n": 0, "tasks": {}}
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
        task = task_of(cfg, step)
        epoch, batch_idx = next(streams[task])
        samples = [pools[task][i] for i in batch_idx]
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        loss, info, gnorm = train_step(model_for_train, samples, cfg.seed * 1_000_003 + step * world + rank,
                                       opt, params, autocast, task=task)
        if compressor is not None:
            compressor.invalidate_fingerprint()
        step += 1
        # losses stay on the device between log steps: reading one per step would make the host
        # wait for every step and leave the GPU idle while the next batch is built
        window["samples"] += len(samples) * world
        window["tokens"] += (info["enc_tokens"] + info["dec_tokens"]) * world
        window["loss"] = window["loss"] + loss
        window["n"] += 1
        window["anchored"] = window.get("anchored", 0) + (info.get("anchor_tokens", 0) > 0)
        tl = window["tasks"].setdefault(task, [0.0, 0])
        tl[0] = tl[0] + loss
        tl[1] += 1
        if bar is not None:
            bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            mean_loss = float(window["loss"]) / window["n"]  # the one sync per log window
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"non-finite loss in steps {step - window['n'] + 1}..{step}")
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.3f}")
        if rank == 0 and step % cfg.log_every == 0:
            dt = time.time() - window["t"]
            rec = {"step": step, "epoch": epoch, "loss": mean_loss, "lr": _lr_at(step - 1, cfg),
                   "grad_norm": float(gnorm), "samples_per_s": window["samples"] / dt,
                   "tokens_per_s": window["tokens"] / dt,
                   "tflops": 6 * n_params * window["tokens"] / dt / 1e12,
                   "elapsed_min": (time.time() - t0) / 60, "samples_seen": step * cfg.batch_size * world}
            if cfg.stage == "mix":
                rec.update({f"loss_{t}": float(v[0]) / v[1] for t, v in window["tasks"].items()})
            if cfg.anchors:  # share of this window's steps whose prompts carried anchors
                rec["anchored_steps"] = window.get("anchored", 0) / window["n"]
            log.write(json.dumps(rec) + "\n")
            log.flush()
            window = {"t": time.time(), "samples": 0, "tokens": 0, "loss": 0.0, "n": 0, "tasks": {}}
        if rank == 0 and val_set and step % cfg.eval_every == 0:
            vl = validate(step_module, val_set, cfg, autocast, val_task)
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
        vl = validate(step_module, val_set, cfg, autocast, val_task) if val_set else None
        if vl is not None:
            log.write(json.dumps({"step": step, "val_loss": vl, "elapsed_min": (time.time() - t0) / 60}) + "\n")
            if vl < best:
                best = vl
                _save(compressor, peft_model, out / "best", cfg, step)
                best_path.write_text(json.dumps({"val_loss": vl, "step": step}) + "\n")
        _save_state(compressor, peft_model, opt, out, cfg, step)
        log.close()
        summary = {"step": step, "stop": stop_reason, "minutes": (time.time() - t0) / 60, "val_loss": vl,
                   "best_val_loss": None if best == float("inf") else best, "train_samples": {t: len(p_) for t, p_ in pools.items()},
                   "output": str(out)}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        try:
            from .plots import plot_log

            plot_log(out / "log.jsonl", out / "curves.png")
        except Exception as exc:  # plotting is optional
            logger.warning("could not plot curves: %s", exc)
    if step_module.anchor_pool is not None:
        step_module.anchor_pool.close()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return summary


@torch.no_grad()
def validate(module: StepModule, val_set: Sequence[Any], cfg: TrainConfig, autocast: Any, task: str) -> float:
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
            loss, _ = module(batch, seed=12345 + s, task=task)
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


#: What training writes in its run folder: these files, these folders, and ``teacher_answers_*`` files.
RUN_FILES = ("state.pt", "state.pt.tmp", "train_config.json", "log.jsonl", "summary.json", "curves.png")
RUN_FOLDERS = ("checkpoint", "best")


def check_run_folder(out: Path) -> None:
    """Refuse a run folder whose files (:data:`RUN_FILES`, :data:`RUN_FOLDERS` and everything in
    them, ``teacher_answers_*``) include a symbolic link, or anything but regular files and folders.

    Training writes those in place (``log.jsonl`` is appended to; configs, checkpoints and
    ``best/`` are overwritten), so a planted link would make it write outside the folder, and a
    FIFO would block it. Other entries of the folder are not touched, so not checked. Nothing is
    changed in a refused folder.

    Raises:
        TrainingStateError: naming the first such entry.
    """
    def check(path: Path) -> bool:
        """Whether ``path`` is a folder; raise for a link or a special file."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return False
        if stat.S_ISLNK(mode):
            raise TrainingStateError(f"{path} is a symbolic link; training writes its run folder in place and would "
                                     "write through it: remove the link or use another --output", path=path)
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise TrainingStateError(f"{path} is not a regular file or folder; remove it or use another --output",
                                     path=path)
        return stat.S_ISDIR(mode)

    for name in sorted(os.listdir(out)):
        if name in RUN_FILES or name in RUN_FOLDERS or name.startswith("teacher_answers_"):
            if check(out / name) and name in RUN_FOLDERS:
                for root, dirs, files in os.walk(out / name):  # links to folders are listed, never entered
                    for entry in dirs + files:
                        check(Path(root) / entry)


def read_best_loss(path: Path) -> float:
    """The validation loss of a run's ``best/val.json``: a finite number, or TrainingStateError naming the file.

    A planted NaN, infinity or negative number would keep every later checkpoint from
    becoming the best one; a missing field or another type would fail only at the first
    validation, after training.
    """
    try:
        if path.stat().st_size > 2 ** 16:
            raise ValueError("file too large")
        loss = json.loads(path.read_text(encoding="utf-8")).get("val_loss")
    except (OSError, ValueError, RecursionError, AttributeError) as exc:
        raise TrainingStateError(f"{path}: not a JSON object with 'val_loss' ({type(exc).__name__}: "
                                 f"{str(exc)[:200]})", path=path) from None
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss) or loss < 0:
        raise TrainingStateError(f"{path}: val_loss {loss!r} is not a finite number of at least 0", path=path)
    return float(loss)


def read_teacher_answers(path: Path) -> dict[str, str]:
    """A run's cached teacher answers: a JSON object of question digests (64 hex) to answer strings.

    Raises:
        TrainingStateError: naming the file; deleting it makes the run generate the answers again.
    """
    def bad(why: str) -> TrainingStateError:
        return TrainingStateError(f"{path}: {why}; delete it to generate the teacher answers again", path=path)

    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise bad(f"not valid JSON ({type(exc).__name__})") from None
    if not isinstance(found, dict):
        raise bad(f"not a JSON object but {type(found).__name__}")
    for key, answer in found.items():
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key) or not isinstance(answer, str):
            raise bad(f"entry {key[:70]!r} is not a question digest with an answer string")
    return found


def read_resume_state(path: Path, opt: torch.optim.Optimizer, max_steps: int | None) -> tuple[dict[str, Any], int]:
    """The optimizer state to load into ``opt`` and the step to resume at, from a run's ``state.pt``.

    Nothing is unpickled but tensors and plain containers, and every field is checked before
    use: the step is an integer from 0 to ``max_steps`` (:data:`MAX_RESUME_STEPS` without one);
    the optimizer state has ``opt``'s parameter groups and parameters, and each parameter's
    AdamW moments have its shape, a floating-point dtype and finite values. The optimizer
    settings (learning rate, weight decay, betas...) are the run's, not the file's.

    Raises:
        TrainingStateError: naming the file and the fault.
    """
    def bad(why: str) -> TrainingStateError:
        return TrainingStateError(f"{path}: {why}", path=path)

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged archive, or a pickle of anything but tensors and containers
        raise bad(f"not a training state ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(state, dict):
        raise bad(f"not a dict but {type(state).__name__}")
    missing, unknown = {"optimizer", "step"} - set(state), sorted(map(repr, set(state) - {"optimizer", "step"}))
    if missing or unknown:
        raise bad(f"missing keys {sorted(missing)}" if missing else f"unknown keys {unknown[:5]}")
    step, limit = state["step"], MAX_RESUME_STEPS if max_steps is None else max_steps
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= limit:
        raise bad(f"step {step!r} is not an integer from 0 to {limit}"
                  + (" (this run's --max-steps)" if max_steps is not None else ""))
    saved, ours = state["optimizer"], opt.state_dict()
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) \
            or not isinstance(saved.get("param_groups"), list):
        raise bad("the optimizer state is not a dict of 'state' and 'param_groups'")
    groups = saved["param_groups"]
    if len(groups) != len(ours["param_groups"]) or any(
            not isinstance(g, dict) or g.get("params") != o["params"] for g, o in zip(groups, ours["param_groups"])):
        raise bad("the optimizer state's parameter groups are not those of this run's optimizer")
    params = {i: p for g, o in zip(opt.param_groups, ours["param_groups"]) for i, p in zip(o["params"], g["params"])}
    for i, entry in saved["state"].items():
        if i not in params:
            raise bad(f"the optimizer state has a parameter {i!r} this run's optimizer lacks")
        if not isinstance(entry, dict) or set(entry) != _ADAMW_STATE or not all(
                isinstance(t, torch.Tensor) and t.is_floating_point() and bool(torch.isfinite(t).all())
                for t in entry.values()):
            raise bad(f"the optimizer state of parameter {i} is not finite AdamW moments {sorted(_ADAMW_STATE)}")
        if entry["step"].numel() != 1 or float(entry["step"]) < 0 or any(
                entry[k].shape != params[i].shape for k in ("exp_avg", "exp_avg_sq")):
            raise bad(f"the optimizer state of parameter {i} does not fit its shape {tuple(params[i].shape)}")
    return {"state": saved["state"], "param_groups": ours["param_groups"]}, step


def _load_trainable(compressor: Compressor | None, peft_model: Any, path: Path) -> None:
    if compressor is not None:
        compressor.load_weights(path)
        for p in compressor.trainable_parameters():
            p.data = p.data.float()
    else:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        expected = {n: tuple(t.shape) for n, t in get_peft_model_state_dict(peft_model).items()}
        set_peft_model_state_dict(peft_model, read_checked_tensors(path / "adapter_model.safetensors", expected))
