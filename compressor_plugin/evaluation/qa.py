"""Extractive QA evaluation of compressed contexts against text baselines.

For one seeded subset of a QA file every *system* answers every question with greedy
decoding (at most 24 new tokens, the layout's stop strings), and answers are scored with the
official SQuAD normalisation (EM and F1, maximised over the gold answers). Systems:

* ``full-<layout>``: the context text in the prompt, for each layout (``plain``, ``fewshot``,
  ``chat``); ``full`` repeats the best of them by F1 (its ``layout`` says which).
* ``none``: no context at all (the best full layout without its context).
* ``truncate-k{K}``: each context cut to its first K tokens, in the best full layout (also
  ``truncate-k{K+N}`` for each anchor budget N: the same prompt budget as ``{mode}-k{K}+a{N}``).
* ``{mode}-k{K}``: contexts compressed by a compressor (a checkpoint, or an untrained one
  for smoke tests), answered in the layout(s) the checkpoint was trained for. With one
  layout the system is ``{mode}-k{K}``; with several (or none recorded: every layout of
  ``--layouts``) each is ``{mode}-k{K}-{layout}`` and ``{mode}-k{K}`` is the best of them.
* ``{mode}-k{K}+a{N}``: the same compressed contexts with anchors (``--anchors``): up to N
  tokens of each chunk's exact names, numbers and dates read as text after its k slots.
* ``full-tuned``: the context text in the prompt of a base model fine-tuned with a LoRA
  adapter (the upper bound a compressor is usually compared with).

See ``docs/evaluation.md`` for the JSON layout.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..prompts import QA_LAYOUTS, qa_prompt
from . import metrics
from .data import QAExample, is_label_task, load_qa

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS = 24
SYSTEM_GROUPS = ("full", "none", "truncate", "compressed", "full-tuned")
N_EXAMPLES = 5

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- models and checkpoints
@dataclass
class LoadedCompressor:
    """A compressor with the facts an evaluation records about it."""

    compressor: Any
    name: str  # checkpoint name or path as given, or "untrained"
    path: str | None
    layouts: list[str] | None  # training layout(s) recorded in the checkpoint, if any
    untrained: bool

    @property
    def k(self) -> int:
        return int(self.compressor.k)

    @property
    def mode(self) -> str:
        return str(self.compressor.mode)

    def describe(self) -> dict[str, Any]:
        return {"checkpoint": self.name, "path": self.path, "k": self.k, "mode": self.mode,
                "trained_layouts": self.layouts, "untrained": self.untrained,
                "fingerprint": self.compressor.fingerprint,
                "max_length": int(self.compressor.config.max_length)}


def check_checkpoints(names: Sequence[str], base: Any) -> list[dict[str, Any]]:
    """Fail before any work if a checkpoint is missing, malformed or for another base model.

    Returns each checkpoint's ``config.json`` contents, in order.
    """
    from ..compressor import check_base, read_checkpoint

    metas = []
    for name in names:
        folder, meta = read_checkpoint(name)
        check_base(folder, meta, base)
        metas.append(meta)
    return metas


def load_compressor(checkpoint: str | None = None, *, k: int = 16, mode: str = "kv",
                    device: Any = None, dtype: Any = None, seed: int = 0) -> LoadedCompressor:
    """A compressor on a freshly loaded base model.

    ``checkpoint=None`` builds an *untrained* compressor (random LoRA init and memory
    embeddings, for smoke tests and benchmarks whose outcome does not depend on the weights).
    A fresh base model is loaded every time because the compressor wraps the model with its
    LoRA adapter in place.
    """
    from ..compressor import Compressor, CompressorConfig
    from ..models import load_base_model

    if checkpoint is None:
        base = load_base_model(device=device, dtype=dtype)
        comp = Compressor(base, CompressorConfig(k=k, mode=mode), seed=seed)
        comp.to(base.device)
        return LoadedCompressor(comp, "untrained", None, None, True)
    from ..compressor import read_checkpoint

    folder, meta = read_checkpoint(checkpoint)
    base_name = (meta.get("config") or {}).get("base_model") or None
    base = load_base_model(base_name, device=device, dtype=dtype)
    comp = Compressor.from_pretrained(folder, base=base)
    layouts = recorded_layouts(meta.get("info"))
    return LoadedCompressor(comp, str(checkpoint), str(folder), layouts, False)


def recorded_layouts(info: Any) -> list[str] | None:
    """Training layouts from a checkpoint's ``info`` block: ``layout`` (one) or ``layouts`` (a list).

    Unknown layout names are ignored; ``None`` when nothing usable is recorded.
    """
    if not isinstance(info, dict):
        return None
    one = info.get("layout")
    if isinstance(one, str) and one in QA_LAYOUTS:
        return [one]
    many = info.get("layouts")
    if isinstance(many, (list, tuple)):
        known = [lay for lay in dict.fromkeys(many) if lay in QA_LAYOUTS]
        return known or None
    return None


def adapter_layouts(folder: str | Path) -> list[str] | None:
    """The training layout(s) recorded beside a LoRA adapter, if any.

    Looked up (``layout`` or ``layouts``) in ``train_info.json`` (written by the trainer),
    ``info.json``, or the ``info`` block of a ``config.json``, in the adapter folder.
    """
    folder = Path(folder)
    for fname, nested in (("train_info.json", False), ("info.json", False), ("config.json", True)):
        p = folder / fname
        if not p.is_file():
            continue
        try:
            obj: Any = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        found = recorded_layouts(obj.get("info") if nested and isinstance(obj, dict) else obj)
        if found:
            return found
    return None


def _eval_layouts(recorded: list[str] | None, requested: Sequence[str]) -> list[str]:
    """Layouts to evaluate a trained system in: the recorded ones (restricted to ``requested`` when
    that leaves any), else ``requested``."""
    if not recorded:
        return list(requested)
    both = [lay for lay in recorded if lay in requested]
    return both or list(recorded)


def load_full_tuned(folder: str | Path, *, device: Any = None, dtype: Any = None) -> Any:
    """A :class:`~compressor_plugin.generation.Generator` over the base model with a LoRA adapter
    (saved by peft's ``save_pretrained``) loaded and enabled."""
    from peft import PeftModel

    from ..generation import Generator
    from ..models import BaseModel, load_base_model

    folder = Path(folder).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a peft adapter folder (no adapter_config.json)")
    base = load_base_model(device=device, dtype=dtype)
    peft_model = PeftModel.from_pretrained(base.model, str(folder))
    peft_model.to(base.device)
    peft_model.eval()
    peft_model.requires_grad_(False)
    tuned = BaseModel(model=peft_model, tokenizer=base.tokenizer, name=f"{base.name}+{folder.name}",
                      fingerprint=base.fingerprint)
    return Generator(tuned)


def _free() -> None:
    """Collect garbage and return cached GPU memory (call after dropping references to a model)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- answering and scoring
def answer_all(generator: Any, prompts: Sequence[Sequence[Any]], *, stop: Sequence[str], batch_size: int = 16,
               max_new_tokens: int = MAX_NEW_TOKENS, desc: str = "", progress: bool = True) -> list[Any]:
    """Greedy answers for many prompts, ``batch_size`` at a time (a tqdm bar when ``progress``)."""
    from tqdm.auto import tqdm

    out: list[Any] = []
    starts = range(0, len(prompts), batch_size)
    for s in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        out.extend(generator.generate_batch(prompts[s:s + batch_size], max_new_tokens=max_new_tokens,
                                            temperature=0.0, stop=list(stop)))
    return out


def score_rows(examples: Sequence[QAExample], results: Sequence[Any], *, source_tokens: Sequence[int],
               context_tokens: Sequence[int], label_task: bool) -> list[dict[str, Any]]:
    """Per-question rows: prediction, EM, F1 (and label accuracy), token counts."""
    rows = []
    for ex, res, src, ctx in zip(examples, results, source_tokens, context_tokens):
        pred = metrics.first_line_answer(res.text)
        sc = metrics.squad_scores(pred, ex.answers)
        row = {"id": ex.id, "question": ex.question, "golds": list(ex.answers), "prediction": pred,
               "raw": res.text, "em": sc["em"], "f1": sc["f1"], "prompt_tokens": int(res.prompt_tokens),
               "source_tokens": int(src), "context_tokens": int(ctx)}
        if label_task:
            words = metrics.normalize_answer(pred).split()
            row["accuracy"] = float(bool(words) and words[0] in {a.strip().lower() for a in ex.answers})
        rows.append(row)
    return rows


def summarize(rows: Sequence[dict[str, Any]], seconds: float, **extra: Any) -> dict[str, Any]:
    """System summary: means of EM / F1 / token counts, compression ratio, time, first examples."""
    keys = ["f1", "em", "prompt_tokens", "source_tokens", "context_tokens"]
    if rows and "accuracy" in rows[0]:
        keys.append("accuracy")
    agg = metrics.aggregate(rows, keys)
    out: dict[str, Any] = {"f1": agg["f1"], "em": agg["em"], "n": agg["n"]}
    if "accuracy" in agg:
        out["accuracy"] = agg["accuracy"]
    ctx = agg["context_tokens"]
    out.update(prompt_tokens_mean=agg["prompt_tokens"], source_tokens_mean=agg["source_tokens"],
               context_tokens_mean=ctx,
               compression_ratio=(agg["source_tokens"] / ctx) if ctx and math.isfinite(ctx) and ctx > 0 else None,
               seconds=round(seconds, 3), retention_f1=None)
    out.update(extra)
    out["_rows"] = list(rows)
    return out


def unique_system_name(name: str, checkpoint: str, used: set[str]) -> str:
    """``name``, or ``name@<run>`` when taken: the checkpoint folder's name, or its parent's for a
    run's ``best``/``checkpoint`` folder (``runs/mix/best`` -> ``@mix``); a counter if still taken."""
    if name not in used:
        return name
    p = Path(checkpoint)
    tag = p.parent.name if p.name in ("best", "checkpoint") and p.parent.name else p.name
    out, i = f"{name}@{tag}", 2
    while out in used:
        out, i = f"{name}@{tag}-{i}", i + 1
    return out


def agreement(rows: Sequence[dict[str, Any]], reference: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Fidelity: F1 / EM of each answer against the reference system's answer to the same question.

    The reference is the best full-text system, so ``agreement_f1`` = 1.0 means the system answers
    exactly as the model does when it reads the text (right or wrong), whatever the gold says.
    When the rows carry their gold exact match (``em``), the questions the reference answers
    right are also scored apart: ``kept_em`` is the share of them this system answers right too,
    ``agreement_f1_full_right`` its agreement on them, ``full_right_n`` how many there are (a
    small model reading the text is often wrong, and agreement over all questions then mostly
    measures whether two wrong answers coincide).
    """
    ref = {r["id"]: r for r in reference}
    f1s, ems, right_f1, kept = [], [], [], []
    for r in rows:
        if r["id"] in ref:
            sc = metrics.squad_scores(r["prediction"], [ref[r["id"]]["prediction"]])
            f1s.append(sc["f1"])
            ems.append(sc["em"])
            if ref[r["id"]].get("em") == 1 and "em" in r:
                right_f1.append(sc["f1"])
                kept.append(float(r["em"] == 1))
    n = max(len(f1s), 1)
    out: dict[str, Any] = {"agreement_f1": sum(f1s) / n, "agreement_em": sum(ems) / n}
    if kept:
        out.update(kept_em=sum(kept) / len(kept), agreement_f1_full_right=sum(right_f1) / len(right_f1),
                   full_right_n=len(kept))
    return out


def reference_rows(reference: dict[str, Any], questions: dict[str, str], chunks: int) -> list[dict[str, Any]]:
    """The ``full`` system's answers in an earlier ``eval qa`` result, checked to cover ``questions``.

    ``questions`` maps this run's question ids to their text: a reference row must carry the
    same id *and* the same question (two invented-facts files of other seeds share ids).

    Raises:
        ValueError: not an ``eval qa`` result, another number of chunks per question, no
            ``full`` answers, some questions missing (the earlier run kept only its first
            examples, or asked other questions), or a question of the same id that differs.
    """
    if not isinstance(reference, dict) or reference.get("kind") != "eval-qa":
        raise ValueError("the reference is not an 'eval qa' result JSON")
    config = reference.get("config") if isinstance(reference.get("config"), dict) else {}
    if config.get("chunks", 1) != chunks:
        raise ValueError(f"the reference result has {config.get('chunks')!r} chunks per question and this run {chunks}: "
                         "the same questions with other distractors are not the same prompts")
    examples = reference.get("examples") if isinstance(reference.get("examples"), dict) else {}
    rows = examples.get("full")
    if not isinstance(rows, list) or not rows:
        raise ValueError("the reference result has no 'full' system answers: run it with the full systems")
    known = {r["id"]: r for r in rows
             if isinstance(r, dict) and isinstance(r.get("id"), str) and isinstance(r.get("prediction"), str)
             and isinstance(r.get("f1"), (int, float)) and not isinstance(r.get("f1"), bool)}
    missing = [i for i in questions if i not in known]
    if missing:
        raise ValueError(
            f"the reference result lacks {len(missing)} of this run's {len(questions)} questions (first: "
            f"{missing[0]!r}): write it with --examples all, on the same --data, --limit, --seed and --chunks")
    other = [i for i, q in questions.items() if known[i].get("question") != q]
    if other:
        raise ValueError(f"the reference result asks other questions under {len(other)} of this run's ids (first: "
                         f"{other[0]!r}): it was made from another data file")
    return [known[i] for i in questions]


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _truncate(tokenizer: Any, text: str, k: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:k]) if len(ids) > k else text


# ---------------------------------------------------------------------- the evaluation
def run_qa_eval(
    data: str | Path,
    *,
    limit: int | None = None,
    seed: int = 0,
    checkpoints: Sequence[str] = (),
    k: int | None = None,
    mode: str = "kv",
    full_tuned: str | Path | None = None,
    layouts: Sequence[str] = QA_LAYOUTS,
    systems: Iterable[str] | None = None,
    device: Any = None,
    dtype: Any = None,
    batch_size: int = 16,
    chunks: int = 1,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = True,
    log: Log | None = _stderr,
    anchors: Sequence[int] = (0,),
    anchor_context: int | None = None,
    question_anchors: bool = False,
    window_shares: Sequence[float] | None = None,
    keep_examples: int | None = N_EXAMPLES,
    reference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate QA systems on a seeded subset of ``data`` and return the result dict.

    Args:
        data: QA JSONL (``context``, ``question``, ``answers``).
        limit, seed: seeded subset of ``limit`` questions (all when ``None``).
        checkpoints: compressor checkpoint folders or shipped names, one ``{mode}-k{K}`` system each.
        k, mode: also evaluate an *untrained* compressor with these settings (smoke tests).
        full_tuned: a peft LoRA adapter folder for the ``full-tuned`` system.
        layouts: prompt layouts for the ``full-*`` systems (and for compressors whose training
            layout is unknown).
        systems: groups to run, from :data:`SYSTEM_GROUPS`; default all that apply.
        device, dtype: where and how to load the model (default: CUDA bf16 when available, else CPU fp32).
        batch_size: prompts per batched decode.
        chunks: contexts per question (gold among ``chunks - 1`` seeded distractors).
        max_new_tokens: answer length limit.
        progress: tqdm progress bars.
        log: called with one line per finished system (``None`` for silence).
        anchors: anchor token budgets (:mod:`compressor_plugin.anchors`); every compressed
            system is evaluated at each, as ``{mode}-k{K}+a{N}`` (budget 0 keeps the plain
            name). The K/V is computed once; only the anchor ids differ.
        anchor_context: words kept before numbers and dates in anchors (default
            :data:`~compressor_plugin.anchors.DEFAULT_LEFT_CONTEXT`); recorded in the config.
        question_anchors: also evaluate, for each budget N > 0, ``{mode}-k{K}+q{N}``: anchors
            chosen for each question as the engine chooses them
            (:func:`~compressor_plugin.anchors.question_anchors`: spans of the sentences that
            share words with it first, the prompt's budget shared by relevance). With several
            chunks also ``+q{N}-unshared``: every chunk keeps N.
        window_shares: with ``question_anchors``, the sentence-window shares to evaluate
            (:func:`~compressor_plugin.anchors.select_anchors`); a share S > 0 names its system
            ``+q{N}w{100*S}`` (``+q32w50``), 0 keeps ``+q{N}`` (spans only). Default: the
            engine's :data:`~compressor_plugin.anchors.DEFAULT_WINDOW_SHARE` alone.
        keep_examples: per-question rows kept per system in the result's ``examples`` (``None``:
            every question, so a later run can use this one as its ``reference``).
        reference: an earlier ``eval qa`` result kept with ``keep_examples=None`` whose ``full``
            system answered the same questions: when this run has no ``full`` system, agreement
            and retention are measured against those answers (full text once, compressors many times).

    Raises:
        ValueError: ``reference`` does not hold ``full`` answers to this run's questions
            (:func:`reference_rows`).
    """
    import dataclasses

    import torch

    from ..anchors import DEFAULT_LEFT_CONTEXT, DEFAULT_WINDOW_SHARE, anchor_spans, check_budget, check_window_share, with_anchors
    from ..anchors import question_anchors as question_anchor_ids

    from ..compressor import checkpoints_base
    from ..generation import Generator
    from ..models import load_base_model

    log = log or (lambda _m: None)
    groups = set(SYSTEM_GROUPS if systems is None else systems)
    unknown = groups - set(SYSTEM_GROUPS)
    if unknown:
        raise ValueError(f"unknown system group(s) {sorted(unknown)}; choose from {SYSTEM_GROUPS}")
    layouts = list(dict.fromkeys(layouts))
    bad = [lay for lay in layouts if lay not in QA_LAYOUTS]
    if bad or not layouts:
        raise ValueError(f"unknown layout(s) {bad}; choose from {QA_LAYOUTS}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if k is not None and mode not in ("kv", "embedding"):
        raise ValueError("mode must be 'kv' or 'embedding'")
    if full_tuned is not None:
        groups.add("full-tuned")
    anchors = list(dict.fromkeys(check_budget(int(a)) for a in anchors)) or [0]
    left = DEFAULT_LEFT_CONTEXT if anchor_context is None else int(anchor_context)
    shares = list(dict.fromkeys(check_window_share(w) for w in
                                ([DEFAULT_WINDOW_SHARE] if window_shares is None else window_shares)))
    if not shares:
        raise ValueError("window_shares is empty")

    t_start = time.perf_counter()
    examples = load_qa(data, limit=limit, seed=seed, chunks=chunks)
    # checked before any model runs: a bad reference fails in a second, not after the systems
    ref_rows = reference_rows(reference, {ex.id: ex.question for ex in examples}, chunks) if reference is not None else None
    label_task = is_label_task(examples)
    base = load_base_model(checkpoints_base(checkpoints), device=device, dtype=dtype)
    metas = dict(zip(checkpoints, check_checkpoints(checkpoints, base)))
    tok = base.tokenizer
    from .report import environment

    env = environment(base)
    skipped: dict[str, str] = {}
    if "chat" in layouts and not getattr(tok, "chat_template", None):
        layouts.remove("chat")
        skipped["full-chat"] = "the tokenizer has no chat template"
        if not layouts:
            raise ValueError("no usable layout: the tokenizer has no chat template")
    src_tokens = [sum(_token_count(tok, c) for c in ex.contexts) for ex in examples]
    stop_of = {lay: qa_prompt(lay, "q", tok).stop for lay in QA_LAYOUTS
               if lay != "chat" or getattr(tok, "chat_template", None)}

    results: dict[str, dict[str, Any]] = {}

    def run_text_system(name: str, gen: Any, layout: str, ctx_fn: Callable[[QAExample], list[str]],
                        src: Sequence[int], **extra: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        prompts, ctx_toks = [], []
        for ex in examples:
            ctxs = ctx_fn(ex)
            prompts.append(qa_prompt(layout, ex.question, tok).segments(ctxs))
            ctx_toks.append(sum(_token_count(tok, c) for c in ctxs))
        res = answer_all(gen, prompts, stop=stop_of[layout], batch_size=batch_size,
                         max_new_tokens=max_new_tokens, desc=name, progress=progress)
        rows = score_rows(examples, res, source_tokens=src, context_tokens=ctx_toks, label_task=label_task)
        summary = summarize(rows, time.perf_counter() - t0, layout=layout, **extra)
        results[name] = summary
        log(f"{name}: F1 {summary['f1']:.3f} EM {summary['em']:.3f} ({summary['seconds']:.1f} s)")
        return summary

    def pick_best(prefix: str, names: Sequence[str], **extra: Any) -> str | None:
        """Copy the best of ``names`` (by F1, first wins ties) to ``prefix``."""
        have = [n for n in names if n in results]
        if not have:
            return None
        best = max(have, key=lambda n: (results[n]["f1"], -have.index(n)))
        results[prefix] = {**results[best], "best_of": have, **extra}
        return results[best]["layout"]

    # -- text baselines with the untouched base model
    plain_gen = Generator(base)
    best_layout = layouts[0]
    if "full" in groups:
        for lay in layouts:
            run_text_system(f"full-{lay}", plain_gen, lay, lambda ex: list(ex.contexts), src_tokens)
        best_layout = pick_best("full", [f"full-{lay}" for lay in layouts]) or best_layout
    if "none" in groups:
        run_text_system("none", plain_gen, best_layout, lambda ex: [], src_tokens)

    loaded_specs: list[tuple[str | None, dict[str, Any]]] = [(c, {}) for c in checkpoints]
    if k is not None:
        loaded_specs.append((None, {"k": k, "mode": mode}))
    ks_for_truncate: list[int] = []
    checkpoint_meta: list[dict[str, Any]] = []
    # Resolve checkpoint k's up front (truncate-k{K} needs them before the base model is wrapped).
    for ckpt, spec in loaded_specs:
        if ckpt is None:
            ks_for_truncate.append(int(spec["k"]))
        else:
            ks_for_truncate.append(int((metas[ckpt].get("config") or {}).get("k", 16)))
    if "truncate" in groups:
        # the same prompt budget as each compressed system: k, and k + N for each anchor budget N
        for kk in dict.fromkeys(kk + a for kk in ks_for_truncate for a in anchors):
            run_text_system(f"truncate-k{kk}", plain_gen, best_layout,
                            lambda ex, kk=kk: [_truncate(tok, c, kk) for c in ex.contexts], src_tokens, k=kk)
    del plain_gen, base
    _free()

    # -- compressed systems, one fresh base model per compressor
    if "compressed" in groups:
        used_names: set[str] = set()
        for ckpt, spec in loaded_specs:
            t_load = time.perf_counter()
            lc = load_compressor(ckpt, k=spec.get("k", 16), mode=spec.get("mode", "kv"), device=device, dtype=dtype)
            load_s = time.perf_counter() - t_load
            if lc.compressor.base.fingerprint != env["model_fingerprint"]:
                raise ValueError(f"checkpoint {lc.name} is for base model {lc.compressor.base.name}, but the text "
                                 f"baselines ran on {env['model']}; evaluate one base model at a time")
            name = unique_system_name(f"{lc.mode}-k{lc.k}", lc.name, used_names)
            used_names.add(name)
            info = lc.describe()
            checkpoint_meta.append({"system": name, **info, "load_seconds": round(load_s, 3)})
            comp = lc.compressor
            gen = Generator(comp.base, comp)
            # compress every distinct context once
            t0 = time.perf_counter()
            uniq = list(dict.fromkeys(c for ex in examples for c in ex.contexts))
            limit_tok = int(comp.config.max_length)
            n_trunc = sum(1 for c in uniq if _token_count(tok, c) > limit_tok)
            ctxs = comp.compress(uniq, batch_size=batch_size, truncate=True, progress=progress)
            compress_s = time.perf_counter() - t0
            uniq_ids = comp.tokenize(uniq, truncate=True)
            eval_layouts = [lay for lay in _eval_layouts(lc.layouts, layouts) if lay in stop_of]
            if not eval_layouts:
                raise ValueError(f"{lc.name}: none of its layouts {lc.layouts} can be used with this tokenizer")
            single = len(eval_layouts) == 1
            spans_of: dict[str, tuple[str, list]] = {}
            if question_anchors:  # each chunk's text as compressed, and its candidate spans
                for c, ids in zip(uniq, uniq_ids):
                    t = tok.decode(list(ids))
                    spans_of[c] = (t, anchor_spans(t, tok, left_context=left))
            # (budget, question anchors: None = chosen once / "shared" = the engine's / "each" = not shared,
            #  sentence-window share)
            variants = [(b, None, 0.0) for b in anchors]
            for ws in shares:
                variants += [(b, "shared", ws) for b in anchors if b and question_anchors]
                if question_anchors and chunks > 1:
                    variants += [(b, "each", ws) for b in anchors if b]
            for budget, by_question, ws in variants:
                by_text = {c: with_anchors(x, ids, tok, budget, left_context=left)
                           for c, x, ids in zip(uniq, ctxs, uniq_ids)}
                per_example = [[by_text[c] for c in ex.contexts] for ex in examples]
                if by_question:  # anchors chosen for each question (as the engine does): contexts per example
                    per_example = [
                        [dataclasses.replace(x, anchor_ids=torch.tensor(a, dtype=torch.long) if a else None)
                         for x, a in zip(cs, question_anchor_ids([spans_of[c] for c in ex.contexts], tok, budget,
                                                                 ex.question, share=by_question == "shared",
                                                                 window_share=ws))]
                        for ex, cs in zip(examples, per_example)]
                a_name = name if budget == 0 else f"{name}+{'q' if by_question else 'a'}{budget}"
                if by_question and ws:
                    a_name += f"w{round(ws * 100)}"
                if by_question == "each":
                    a_name += "-unshared"
                names = []
                for lay in eval_layouts:
                    sys_name = a_name if single else f"{a_name}-{lay}"
                    t1 = time.perf_counter()
                    prompts = [qa_prompt(lay, ex.question, tok).segments(cs) for ex, cs in zip(examples, per_example)]
                    res = answer_all(gen, prompts, stop=stop_of[lay], batch_size=batch_size,
                                     max_new_tokens=max_new_tokens, desc=sys_name, progress=progress)
                    rows = score_rows(examples, res, source_tokens=[r.source_tokens for r in res],
                                      context_tokens=[r.compressed_tokens for r in res], label_task=label_task)
                    # each system is charged the compression of all its contexts (done once, shared by layouts)
                    secs = time.perf_counter() - t1 + compress_s
                    results[sys_name] = summarize(rows, secs, layout=lay, k=lc.k, mode=lc.mode, checkpoint=lc.name,
                                                  untrained=lc.untrained, compress_seconds=round(compress_s, 3),
                                                  truncated_contexts=n_trunc, anchors=budget,
                                                  question_anchors=by_question or False,
                                                  window_share=ws if by_question else None,
                                                  anchor_tokens_mean=sum(x.anchor_count for cs in per_example for x in cs)
                                                  / max(sum(len(cs) for cs in per_example), 1))
                    s = results[sys_name]
                    log(f"{sys_name}: F1 {s['f1']:.3f} EM {s['em']:.3f} ({s['seconds']:.1f} s)")
                    names.append(sys_name)
                if not single:
                    pick_best(a_name, names)
            del gen, comp, lc, ctxs, by_text
            _free()

    # -- full context through a fine-tuned (LoRA) base model
    if "full-tuned" in groups and full_tuned is not None:
        gen = load_full_tuned(full_tuned, device=device, dtype=dtype)
        tuned_layouts = [lay for lay in _eval_layouts(adapter_layouts(full_tuned), layouts) if lay in stop_of]
        if not tuned_layouts:
            raise ValueError(f"{full_tuned}: none of its training layouts can be used with this tokenizer")
        single = len(tuned_layouts) == 1
        names = []
        for tl in tuned_layouts:
            nm = "full-tuned" if single else f"full-tuned-{tl}"
            run_text_system(nm, gen, tl, lambda ex: list(ex.contexts), src_tokens, adapter=str(full_tuned))
            names.append(nm)
        if not single:
            pick_best("full-tuned", names)
        del gen
        _free()
    elif "full-tuned" in groups and systems is not None:
        skipped["full-tuned"] = "no --full-tuned adapter given"

    # -- retention, agreement with the best full-text answers, and examples
    full_f1 = results.get("full", {}).get("f1")
    full_rows = results.get("full", {}).get("_rows")
    if full_rows is None and ref_rows is not None:  # the reference run's full text, on these questions
        full_rows = ref_rows
        full_f1 = metrics.aggregate(ref_rows, ["f1"])["f1"]
    examples_out: dict[str, list[dict[str, Any]]] = {}
    for name, s in results.items():
        if full_f1 is not None and full_f1 > 0:
            s["retention_f1"] = s["f1"] / full_f1
        if full_rows is not None and s.get("_rows"):
            s.update(agreement(s["_rows"], full_rows))
        rows = s.pop("_rows") if "_rows" in s else []
        examples_out[name] = [{k2: r[k2] for k2 in ("id", "question", "golds", "prediction", "f1", "em")}
                              for r in (rows if keep_examples is None else rows[:keep_examples])]
        ctx_mean = s.get("context_tokens_mean")
        # prompt positions one chunk takes (its text, or its k slots plus anchor tokens)
        s["tokens_per_chunk"] = ctx_mean / chunks if isinstance(ctx_mean, (int, float)) else None
    ordered = _order(results)
    config: dict[str, Any] = {
        "limit": limit, "chunks": chunks, "layouts": layouts, "best_layout": best_layout if "full" in groups else None,
        "systems": sorted(groups), "batch_size": batch_size, "max_new_tokens": max_new_tokens,
        "decoding": "greedy", "label_task": label_task, "checkpoints": checkpoint_meta,
        "full_tuned": str(full_tuned) if full_tuned else None, "skipped": skipped,
        "anchors": anchors, "anchor_context": left, "question_anchors": bool(question_anchors),
        "window_shares": shares if question_anchors else None,
        "total_seconds": round(time.perf_counter() - t_start, 3),
        **env,
    }
    return {"kind": "eval-qa", "data": str(data), "n": len(examples), "seed": seed,
            "systems": {n: results[n] for n in ordered}, "config": config,
            "examples": {n: examples_out[n] for n in ordered}}


def _order(results: dict[str, Any]) -> list[str]:
    """Systems in reading order: full-*, full, none, truncate-*, compressed, full-tuned*
    (insertion order within each group)."""
    names = list(results)

    def key(name: str) -> tuple[int, int]:
        if name.startswith("full-tuned"):
            group = 5
        elif name == "full":
            group = 1
        elif name.startswith("full-"):
            group = 0
        elif name == "none":
            group = 2
        elif name.startswith("truncate-"):
            group = 3
        else:
            group = 4
        return (group, names.index(name))
    return sorted(names, key=key)
