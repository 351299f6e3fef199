"""Regeneration evaluation: how much of a text can the decoder reproduce from its compressed form?

Each text is compressed, then the unchanged base model is prompted with
:func:`compressor_plugin.prompts.regen_segments` (the context followed by
``"\\nRepeat the text above:\\n"``) and decodes greedily for at most ``source tokens + 16``
tokens, stopping at end-of-sequence. The output is scored against the text with ROUGE-L F
and sentence BLEU, overall and per source-length bucket (``<=96``, ``<=192``, ``<=288``,
``<=384``, ``<=512``).

The ``full-kv`` system puts the exact keys and values of the whole text in the cache (what
plain prefix caching would store). Its output is identical to having the text itself in the
prompt, so it measures how well the frozen model copies when asked to, not a ceiling: the
135M default model paraphrases and loops rather than copying (ROUGE-L about 0.1-0.25).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..prompts import regen_segments
from . import metrics
from .data import load_texts
from .qa import Log, _free, _order, _stderr, check_checkpoints, load_compressor

EXTRA_TOKENS = 16
N_EXAMPLES = 5


def _generate_rows(gen: Any, contexts_for: Callable[[list[int]], list[Any]], src_lens: Sequence[int], *,
                   batch_size: int, desc: str, progress: bool) -> list[Any]:
    """Greedy regeneration for every item, batched by similar length.

    ``contexts_for(indices)`` returns the contexts of those items (so the caller decides when
    they are computed). Each row decodes at most ``src_len + 16`` tokens; a batch runs to the
    largest limit in it and longer rows are cut back to their own limit afterwards (greedy
    decoding of a row does not depend on the other rows).
    """
    from tqdm.auto import tqdm

    order = sorted(range(len(src_lens)), key=lambda i: src_lens[i])
    out: list[Any] = [None] * len(src_lens)
    tok = gen.tokenizer
    for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        idx = order[s:s + batch_size]
        ctxs = contexts_for(idx)
        limit = max(src_lens[i] for i in idx) + EXTRA_TOKENS
        res = gen.generate_batch([regen_segments(c) for c in ctxs], max_new_tokens=limit, temperature=0.0, stop=[])
        for i, r in zip(idx, res):
            own = src_lens[i] + EXTRA_TOKENS
            ids = r.token_ids[:own]
            out[i] = (tok.decode(ids, skip_special_tokens=True), r, len(ids))
        del ctxs
    return out


def _summarize(rows: list[dict[str, Any]], seconds: float, **extra: Any) -> dict[str, Any]:
    agg = metrics.aggregate(rows, ["rouge_l", "rouge_l_precision", "rouge_l_recall", "bleu", "exact",
                                   "prompt_tokens", "source_tokens", "generated_tokens"])
    by: dict[str, dict[str, Any]] = {}
    for bucket in dict.fromkeys(r["bucket"] for r in rows):
        sub = [r for r in rows if r["bucket"] == bucket]
        a = metrics.aggregate(sub, ["rouge_l", "bleu", "source_tokens"])
        by[bucket] = {"rouge_l": a["rouge_l"], "bleu": a["bleu"], "n": a["n"], "source_tokens_mean": a["source_tokens"]}
    by = dict(sorted(by.items(), key=lambda kv: (kv[0].startswith(">"), int("".join(c for c in kv[0] if c.isdigit())))))
    ctx_tokens = extra.pop("context_tokens_mean", None)
    out = {"rouge_l": agg["rouge_l"], "rouge_l_precision": agg["rouge_l_precision"],
           "rouge_l_recall": agg["rouge_l_recall"], "bleu": agg["bleu"], "exact_match": agg["exact"],
           "n": agg["n"], "prompt_tokens_mean": agg["prompt_tokens"], "source_tokens_mean": agg["source_tokens"],
           "context_tokens_mean": ctx_tokens, "generated_tokens_mean": agg["generated_tokens"],
           "compression_ratio": (agg["source_tokens"] / ctx_tokens) if ctx_tokens else None,
           "seconds": round(seconds, 3), "by_length": by}
    out.update(extra)
    out["_rows"] = rows
    return out


def _score(ids: Sequence[str], refs: Sequence[str], src_lens: Sequence[int], gens: Sequence[Any]) -> list[dict[str, Any]]:
    rows = []
    for rid, ref, n, (pred, res, n_gen) in zip(ids, refs, src_lens, gens):
        rl = metrics.rouge_l(pred, ref)
        rows.append({"id": rid, "reference": ref, "prediction": pred, "rouge_l": rl["f"],
                     "rouge_l_precision": rl["precision"], "rouge_l_recall": rl["recall"],
                     "bleu": metrics.bleu(pred, ref), "exact": float(pred.strip() == ref.strip()),
                     "prompt_tokens": int(res.prompt_tokens), "source_tokens": int(n), "generated_tokens": n_gen,
                     "bucket": metrics.length_bucket(n)})
    return rows


def run_regen_eval(
    data: str | Path,
    *,
    limit: int | None = None,
    seed: int = 0,
    checkpoints: Sequence[str] = (),
    k: int | None = None,
    mode: str = "kv",
    max_tokens: int = 512,
    full_kv: bool = True,
    device: Any = None,
    dtype: Any = None,
    batch_size: int = 16,
    progress: bool = True,
    log: Log | None = _stderr,
) -> dict[str, Any]:
    """Regeneration quality of compressors (and the exact ``full-kv`` reference) on ``data``.

    Args:
        data: a corpus JSONL (``text``) or a QA JSONL (distinct ``context`` values are used).
        limit, seed: seeded subset of ``limit`` texts.
        checkpoints: compressor checkpoints (``{mode}-k{K}`` system each).
        k, mode: also an untrained compressor (smoke tests).
        max_tokens: texts are cut to their first ``max_tokens`` tokens first (the cut text is the reference).
        full_kv: include the ``full-kv`` reference system.
        device, dtype, batch_size, progress, log: as in :func:`compressor_plugin.evaluation.qa.run_qa_eval`.
    """
    from ..generation import Generator
    from ..models import load_base_model
    from .report import environment

    log = log or (lambda _m: None)
    if max_tokens < 1:
        raise ValueError("max_tokens must be positive")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    t_start = time.perf_counter()
    items = load_texts(data, limit=limit, seed=seed)
    base = load_base_model(device=device, dtype=dtype)
    check_checkpoints(checkpoints, base)
    env = environment(base)
    tok = base.tokenizer
    ids_of = [tok(t, add_special_tokens=False)["input_ids"] for _, t in items]
    refs = [tok.decode(ids[:max_tokens]).strip() if len(ids) > max_tokens else t
            for (_, t), ids in zip(items, ids_of)]
    src_lens = [len(tok(r, add_special_tokens=False)["input_ids"]) for r in refs]
    item_ids = [i for i, _ in items]
    n_cut = sum(1 for ids in ids_of if len(ids) > max_tokens)
    results: dict[str, dict[str, Any]] = {}
    checkpoint_meta: list[dict[str, Any]] = []

    if full_kv:
        gen = Generator(base)
        t0 = time.perf_counter()
        outs = _generate_rows(gen, lambda idx: [gen.context_from_text(refs[i]) for i in idx], src_lens,
                              batch_size=batch_size, desc="full-kv", progress=progress)
        rows = _score(item_ids, refs, src_lens, outs)
        results["full-kv"] = _summarize(rows, time.perf_counter() - t0,
                                        context_tokens_mean=sum(src_lens) / max(len(src_lens), 1))
        log(f"full-kv: ROUGE-L {results['full-kv']['rouge_l']:.3f} BLEU {results['full-kv']['bleu']:.3f} "
            f"({results['full-kv']['seconds']:.1f} s)")
        gen = None
    base = None
    _free()

    specs: list[tuple[str | None, dict[str, Any]]] = [(c, {}) for c in checkpoints]
    if k is not None:
        specs.append((None, {"k": k, "mode": mode}))
    used: set[str] = set()
    for ckpt, spec in specs:
        lc = load_compressor(ckpt, k=spec.get("k", 16), mode=spec.get("mode", "kv"), device=device, dtype=dtype)
        name = f"{lc.mode}-k{lc.k}"
        if name in used:
            name = f"{name}@{Path(lc.name).name}"
        used.add(name)
        checkpoint_meta.append({"system": name, **lc.describe()})
        comp = lc.compressor
        gen = Generator(comp.base, comp)
        t0 = time.perf_counter()
        ctxs = comp.compress(refs, batch_size=batch_size, truncate=True, progress=progress)
        outs = _generate_rows(gen, lambda idx: [ctxs[i] for i in idx], src_lens, batch_size=batch_size,
                              desc=name, progress=progress)
        rows = _score(item_ids, refs, src_lens, outs)
        results[name] = _summarize(rows, time.perf_counter() - t0, context_tokens_mean=float(lc.k),
                                   k=lc.k, mode=lc.mode, checkpoint=lc.name, untrained=lc.untrained)
        log(f"{name}: ROUGE-L {results[name]['rouge_l']:.3f} BLEU {results[name]['bleu']:.3f} "
            f"({results[name]['seconds']:.1f} s)")
        gen = comp = lc = ctxs = None
        _free()

    examples: dict[str, list[dict[str, Any]]] = {}
    for name, s in results.items():
        rows = s.pop("_rows")
        examples[name] = [{k2: r[k2] for k2 in ("id", "source_tokens", "rouge_l", "reference", "prediction")}
                          for r in rows[:N_EXAMPLES]]
    ordered = _order(results)
    config = {"limit": limit, "max_tokens": max_tokens, "texts_cut": n_cut, "extra_new_tokens": EXTRA_TOKENS,
              "batch_size": batch_size, "decoding": "greedy, stop at end-of-sequence", "checkpoints": checkpoint_meta,
              "length_buckets": ["<=96", "<=192", "<=288", "<=384", "<=512"],
              "total_seconds": round(time.perf_counter() - t_start, 3), **env}
    return {"kind": "eval-regen", "data": str(data), "n": len(items), "seed": seed,
            "systems": {n: results[n] for n in ordered}, "config": config,
            "examples": {n: examples[n] for n in ordered}}


__all__ = ["run_regen_eval"]
