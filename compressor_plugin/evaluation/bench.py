"""Latency, throughput and size benchmarks.

* :func:`bench_rag`: time to first token and end-to-end latency of a RAG query over n chunks
  of T tokens, answered (a) with the chunk texts in the prompt, (b) from compressed chunks
  already in a :class:`~compressor_plugin.store.ContextStore` (store lookup + injection) and
  (c) from chunks compressed on a store miss (compress, store, then answer).
* :func:`bench_compress`: compression throughput (chunks/s, tokens/s) by batch size, with a
  FLOP count of the encoder forward and the achieved TFLOP/s.
* :func:`bench_disk`: bytes per stored chunk for k = 1, 4, 16 in ``kv`` and ``embedding``
  mode against the exact K/V of the same text.

FLOPs of one encoder forward over a batch of B rows of T text tokens plus k memory tokens
(``S = T + k`` positions, every row the same length, so no padding)::

    FLOPs = 2 * P * B * S  +  4 * L * B * S^2 * d

with P the parameters of the transformer layers including the LoRA matrices (token
embeddings excluded: a lookup, and no LM head runs), L the layer count and d the attention
width (heads x head_dim). The first term counts one multiply-add per weight per position;
the second counts the ``QK^T`` and ``AV`` products of full (non-causal) attention, the usual
convention, although causal kernels skip about half of that work.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

from ..prompts import qa_prompt
from .data import bench_source, make_chunks
from .qa import Log, _stderr, load_compressor

RAG_QUESTION = "What is the main contribution described in the context?"

RSS_NOTE = ("CPU: peak_mem_bytes is the process's resident-set high-water mark (getrusage ru_maxrss): it "
            "only grows, covers the whole process (model weights included) and is not a per-system figure; "
            "tracemalloc and RSS deltas do not see torch's allocations meaningfully")
CUDA_NOTE = ("CUDA: peak_mem_bytes is torch.cuda.max_memory_allocated() during the measured runs of that row "
             "(weights included); peak_extra_bytes subtracts the memory allocated before them")


# ---------------------------------------------------------------------- helpers
def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


class MemoryProbe:
    """Peak memory over a block of work: CUDA allocator peak on GPU, process max RSS on CPU."""

    def __init__(self, device: Any):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self.before = 0

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)

    def peak(self) -> dict[str, int]:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = int(torch.cuda.max_memory_allocated(self.device))
            return {"peak_mem_bytes": peak, "peak_extra_bytes": peak - int(self.before)}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return {"peak_mem_bytes": int(rss * scale)}

    @property
    def note(self) -> str:
        return CUDA_NOTE if self.cuda else RSS_NOTE


def _stats(values: Sequence[float], prefix: str) -> dict[str, float]:
    return {f"{prefix}_median": statistics.median(values), f"{prefix}_mean": statistics.fmean(values),
            f"{prefix}_min": min(values)}


def _parse_default_checkpoint(checkpoint: str | None, k: int | None, mode: str, log: Log) -> tuple[str | None, int, str, str | None]:
    """Resolve ``--checkpoint`` / ``--k`` for the benchmarks.

    Returns ``(checkpoint or None, k, mode, note)``: an explicit ``--k`` means an untrained
    compressor; a checkpoint that is not available (the shipped ``default`` before it is
    trained) falls back to an untrained ``kv`` k=16 compressor, with a note: timings and sizes
    depend only on shapes, not on the weights.
    """
    from ..compressor import resolve_checkpoint

    if k is not None:
        return None, int(k), mode, "untrained compressor (--k given)"
    name = checkpoint or "default"
    try:
        resolve_checkpoint(name)
        return name, 16, mode, None
    except FileNotFoundError:
        note = (f"checkpoint {name!r} not available; using an untrained {mode} k=16 compressor "
                "(latency and size depend on shapes only)")
        log(note)
        return None, 16, mode, note


# ---------------------------------------------------------------------- bench rag
def bench_rag(
    n_chunks: Sequence[int] = (1, 2, 4, 8),
    tokens: Sequence[int] = (128, 256, 512),
    *,
    checkpoint: str | None = "default",
    k: int | None = None,
    mode: str = "kv",
    repeats: int = 3,
    max_new_tokens: int = 16,
    device: Any = None,
    dtype: Any = None,
    data: str | None = None,
    store_dir: str | None = None,
    progress: bool = True,
    log: Log | None = _stderr,
    anchors: int = 0,
    static_prefill: bool = False,
) -> dict[str, Any]:
    """Time a RAG answer over ``n`` chunks of ``T`` tokens for every (n, T), three ways.

    ``anchors``: anchor tokens per compressed chunk (0: the K/V alone); they are read as text
    after each chunk's slots, so they add prefill work to every store hit.

    ``static_prefill``: answer with ``Generator(..., static_prefill=True)`` (on a GPU, the
    captured prefill; docs/architecture.md). Each new shape compiles on its first answer, so
    every system of every cell then gets one untimed answer before the timed rounds.

    Systems (rows of the result):

    * ``full``: the chunk texts in the prompt (``plain`` layout: ``Context: ... Question: ... Answer:``).
    * ``store-hit``: the chunks' compressed contexts are already in the store; timed from
      ``ContextStore.get_or_compress`` (key hashing, SQLite lookup, file read, digest check,
      move to the device) through injection, prefill and decoding. It is the first read of
      the entries the store miss just wrote, so every check runs.
    * ``store-miss``: the store is empty; timed from compressing the chunks (and writing
      them to the store) through the answer.
    * ``engine-hit``: what a LangChain or LlamaIndex user runs on a store hit: a prompt string
      holding the chunks' markers, resolved by :meth:`CompressionEngine.resolve` (marker
      checks, store lookups and, with anchors, question anchors chosen from each chunk's
      stored text), then answered; ``resolve_s`` is the resolution alone. It reads the entries
      a second time, so the store serves them from its memory of checked contexts.

    ``ttft_s`` is the time until the first answer token is chosen, ``e2e_s`` until the answer
    is complete (at most ``max_new_tokens`` tokens, no stop string; an end-of-sequence token
    ends it earlier). After one warm-up, each cell runs ``repeats`` rounds in which the four
    systems take turns (full, store-miss, store-hit, engine-hit), so drift in the machine's
    speed reaches every system alike; the figures are medians over the rounds.
    """
    import torch

    from ..engine import CompressionEngine
    from ..generation import Generator
    from ..store import ContextStore

    log = log or (lambda _m: None)
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if not n_chunks or not tokens or min(n_chunks) < 1 or min(tokens) < 1:
        raise ValueError("--n and --tokens need positive integers")
    ckpt, kk, mode, note = _parse_default_checkpoint(checkpoint, k, mode, log)
    lc = load_compressor(ckpt, k=kk, mode=mode, device=device, dtype=dtype)
    comp = lc.compressor
    base = comp.base
    tok = base.tokenizer
    gen = Generator(base, comp, static_prefill=static_prefill)
    texts, source = bench_source(data)
    from .report import environment

    env = environment(base)
    probe = MemoryProbe(base.device)
    too_long = [t for t in tokens if t > comp.config.max_length]
    if too_long:
        raise ValueError(f"chunk length(s) {too_long} exceed the compressor's max_length {comp.config.max_length}")

    prompt_of: Callable[[list[Any]], list[Any]] = lambda ctxs: qa_prompt("plain", RAG_QUESTION, tok).segments(ctxs)
    gen_kwargs = dict(max_new_tokens=max_new_tokens, temperature=0.0, stop=[])
    rows: list[dict[str, Any]] = []
    # always a fresh, temporary store (inside --store-dir when given): the benchmark clears it
    if store_dir is not None:
        os.makedirs(store_dir, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="bench-rag-store-", dir=store_dir)
    store = ContextStore(tmp.name)
    engine = CompressionEngine(comp, store, anchors=anchors)  # the user's path, question anchors included
    engine.generator = gen
    prompt = qa_prompt("plain", RAG_QUESTION, tok)
    try:
        # warm-up: kernels, tokenizer, store connection
        warm = make_chunks(texts, tok, 2, min(tokens), offset=0)
        gen.generate(prompt_of(warm), **gen_kwargs)
        sr = store.get_or_compress(warm, comp, truncate=True, anchors=anchors)
        gen.generate(prompt_of([r.context for r in sr]), **gen_kwargs)
        store.clear()

        from tqdm.auto import tqdm

        grid = [(t, n) for t in tokens for n in n_chunks]
        offset = 3
        for T, n in tqdm(grid, desc="bench rag", unit="cell", disable=not progress, leave=False):
            chunks = make_chunks(texts, tok, n, T, offset=offset)
            offset += n + 1
            src = sum(len(tok(c, add_special_tokens=False)["input_ids"]) for c in chunks)

            def answer(before: Callable[[], tuple[list[Any], float]]) -> tuple[Any, float]:
                segments, t_pre = before()
                return gen.generate(segments, **gen_kwargs), t_pre

            def from_store(expect_hit: bool) -> tuple[list[Any], float]:
                if not expect_hit:
                    store.clear()
                t0 = time.perf_counter()
                sr = store.get_or_compress(chunks, comp, truncate=True, anchors=anchors)
                _sync(base.device)
                t = time.perf_counter() - t0
                if expect_hit and not all(r.hit for r in sr):
                    raise RuntimeError("bench rag: a chunk that was just stored was not found in the store")
                if not expect_hit and any(r.hit for r in sr):
                    raise RuntimeError("bench rag: a cleared store reported a hit")
                return prompt_of([r.context for r in sr]), t

            def from_engine() -> tuple[list[Any], float]:
                t0 = time.perf_counter()
                resolved = engine.resolve(marked)
                _sync(base.device)
                t = time.perf_counter() - t0
                if resolved.resolved != expected:
                    raise RuntimeError("bench rag: the engine did not resolve every chunk from the store")
                return resolved.segments, t

            # (a) full text; (c) store miss: compress (and store) then answer; (b) store hit: the
            # chunks are in the store from the miss just before; (d) the engine on a store hit:
            # markers in a prompt string, resolved, answered. The systems take turns in every
            # round, so a slow spell of the machine falls on all of them alike.
            from_store(False)
            marks = engine.mark(chunks)  # a chunk under the short-chunk rule stays text
            marked = prompt.before + "".join(marks) + prompt.after
            expected = sum(m != c for m, c in zip(marks, chunks))
            systems: list[tuple[str, Callable[[], tuple[list[Any], float]], str | None]] = [
                ("full", lambda: (prompt_of(chunks), 0.0), None),
                ("store-miss", lambda: from_store(False), "compress_s"),
                ("store-hit", lambda: from_store(True), "lookup_s"),
                ("engine-hit", from_engine, "resolve_s"),
            ]
            if static_prefill:  # compile this cell's shapes outside the timing
                for _name, before, _step in systems:
                    answer(before)
            times: dict[str, dict[str, list[float]]] = {name: {"ttft": [], "e2e": [], "pre": [], "new": []}
                                                        for name, _b, _s in systems}
            peaks: dict[str, dict[str, int]] = {}
            last: dict[str, Any] = {}
            for _ in range(repeats):
                for name, before, _step in systems:
                    probe.start()
                    res, t_pre = answer(before)
                    peak = probe.peak()
                    peaks[name] = {key: max(v, peaks.get(name, {}).get(key, v)) for key, v in peak.items()}
                    t = times[name]
                    t["pre"].append(t_pre)
                    t["ttft"].append(t_pre + res.ttft_s)
                    t["e2e"].append(t_pre + res.total_s)
                    t["new"].append(len(res.token_ids))
                    last[name] = res
            for name, _before, step in (systems[0], systems[2], systems[3], systems[1]):
                t = times[name]
                rows.append({"system": name, "n_chunks": n, "chunk_tokens": T, "prompt_tokens": last[name].prompt_tokens,
                             "source_tokens": src, "new_tokens_mean": statistics.fmean(t["new"]),
                             **_stats(t["ttft"], "ttft_s"), **_stats(t["e2e"], "e2e_s"),
                             **(_stats(t["pre"], step) if step else {}), **peaks[name]})
    finally:
        store.close()
        tmp.cleanup()

    full_ttft = {(r["n_chunks"], r["chunk_tokens"]): r["ttft_s_median"] for r in rows if r["system"] == "full"}
    for r in rows:
        f = full_ttft.get((r["n_chunks"], r["chunk_tokens"]))
        r["ttft_speedup_vs_full"] = (f / r["ttft_s_median"]) if f and r["ttft_s_median"] > 0 else None
    del gen, comp, lc
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"kind": "bench-rag", "rows": rows,
            "config": {"n_chunks": list(n_chunks), "chunk_tokens": list(tokens), "repeats": repeats,
                       "max_new_tokens": max_new_tokens, "question": RAG_QUESTION, "layout": "plain",
                       "static_prefill": static_prefill,
                       "checkpoint": ckpt or "untrained", "k": kk, "mode": mode, "note": note, "anchors": anchors,
                       "question_anchors": bool(anchors) and engine.question_anchors,
                       "text_source": source, "memory_note": probe.note, "store_parent_dir": store_dir,
                       "timing": "medians over rounds in which the systems take turns, after one warm-up; ttft = store/compress time + prefill + "
                                 "first token", **env}}


# ---------------------------------------------------------------------- bench compress
def bench_compress(
    batch_sizes: Sequence[int] = (1, 8, 32, 128),
    tokens: int = 512,
    *,
    checkpoint: str | None = "default",
    k: int | None = None,
    mode: str = "kv",
    repeats: int = 3,
    peak_tflops: float | None = None,
    device: Any = None,
    dtype: Any = None,
    data: str | None = None,
    progress: bool = True,
    log: Log | None = _stderr,
    merge_lora: bool = False,
) -> dict[str, Any]:
    """Compression throughput by batch size.

    For each batch size, ``repeats`` timed encoder forwards (``Compressor.encode_ids`` under
    ``torch.no_grad``, inputs pre-tokenised to exactly ``tokens`` ids per chunk, device
    synchronised) after one warm-up, plus one timed call of the public ``Compressor.compress``
    API on the same chunks as text (tokenisation and context objects included).

    ``peak_tflops`` defaults to 989 (H200 bf16 dense) on CUDA and to none on CPU.
    ``merge_lora`` times everything inside :meth:`Compressor.fast_encoder` (LoRA folded into
    the weights, as ``cache build`` runs it). FLOPs:
    :func:`compressor_plugin.caching.build.encoder_flops` per chunk.
    """
    from ..caching.build import H200_BF16_PEAK_TFLOPS, encoder_flops, flop_terms

    log = log or (lambda _m: None)
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("--batch-sizes needs positive integers")
    if tokens < 1 or repeats < 1:
        raise ValueError("tokens and repeats must be positive")
    ckpt, kk, mode, note = _parse_default_checkpoint(checkpoint, k, mode, log)
    lc = load_compressor(ckpt, k=kk, mode=mode, device=device, dtype=dtype)
    comp = lc.compressor
    base = comp.base
    tok = base.tokenizer
    if tokens > comp.config.max_length:
        raise ValueError(f"--tokens {tokens} exceeds the compressor's max_length {comp.config.max_length}")
    cuda = base.device.type == "cuda"
    if peak_tflops is None and cuda:
        peak_tflops = H200_BF16_PEAK_TFLOPS
    texts, source = bench_source(data)
    from .report import environment

    env = environment(base)
    params, layers, attn_width = flop_terms(comp)
    probe = MemoryProbe(base.device)
    seq = tokens + kk
    stream: list[int] = []
    i = 0
    need = max(batch_sizes) * tokens
    while len(stream) < need:
        stream.extend(tok(" " + texts[i % len(texts)].strip(), add_special_tokens=False)["input_ids"])
        i += 1
    with comp.fast_encoder(merge=merge_lora):
        rows = _compress_rows(comp, batch_sizes, tokens, repeats, stream, probe, encoder_flops(comp, seq),
                              peak_tflops, progress)
    del comp, lc
    return {"kind": "bench-compress", "rows": rows,
            "config": {"batch_sizes": list(batch_sizes), "chunk_tokens": tokens, "k": kk, "mode": mode,
                       "checkpoint": ckpt or "untrained", "note": note, "repeats": repeats, "merge_lora": merge_lora,
                       "peak_tflops": peak_tflops, "encoder_params": params, "layers": layers,
                       "attn_width": attn_width, "seq_positions": seq,
                       "flops_formula": "2*P*B*S + 4*L*B*S^2*d (S = tokens + k; P = layer params incl. LoRA, "
                                        "no embeddings; d = heads*head_dim; full, non-causal attention count)",
                       "text_source": source, "memory_note": probe.note, **env}}


def _compress_rows(comp: Any, batch_sizes: Sequence[int], tokens: int, repeats: int, stream: list[int], probe: Any,
                   flops_per_chunk: float, peak_tflops: float | None, progress: bool) -> list[dict[str, Any]]:
    import torch
    from tqdm.auto import tqdm

    base, tok = comp.base, comp.base.tokenizer
    rows = []
    for bs in tqdm(batch_sizes, desc="bench compress", unit="batch size", disable=not progress, leave=False):
        ids = [stream[j * tokens:(j + 1) * tokens] for j in range(bs)]
        with torch.no_grad():
            comp.encode_ids(ids)  # warm-up
            _sync(base.device)
            probe.start()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                out = comp.encode_ids(ids)
                _sync(base.device)
                times.append(time.perf_counter() - t0)
                del out
        mem = probe.peak()
        chunk_texts = [tok.decode(x) for x in ids]
        t0 = time.perf_counter()
        comp.compress(chunk_texts, batch_size=bs, truncate=True)
        _sync(base.device)
        api_s = time.perf_counter() - t0
        t = statistics.median(times)
        flops = bs * flops_per_chunk
        tflops = flops / t / 1e12
        rows.append({"batch_size": bs, "chunk_tokens": tokens, "seconds_median": t, "seconds_min": min(times),
                     "chunks_per_s": bs / t, "tokens_per_s": bs * tokens / t, "flops_per_batch": flops,
                     "achieved_tflops": tflops,
                     "fraction_of_peak": (tflops / peak_tflops) if peak_tflops else None,
                     "api_seconds": api_s, "api_chunks_per_s": bs / api_s, **mem})
    return rows


# ---------------------------------------------------------------------- bench disk
def bench_disk(
    ks: Sequence[int] = (1, 4, 16),
    modes: Sequence[str] = ("kv", "embedding"),
    tokens: Sequence[int] = (128, 256, 512),
    *,
    device: Any = None,
    dtype: Any = None,
    data: str | None = None,
    progress: bool = True,
    log: Log | None = _stderr,
) -> dict[str, Any]:
    """Bytes per stored chunk against the exact K/V of the same text.

    For every chunk length T, the full K/V reference is
    ``Generator.context_from_text(chunk)`` (what prefix caching would keep: T positions at
    every layer). For every (mode, k) an untrained compressor makes the context (sizes depend
    only on shapes). ``nbytes`` counts tensor data, ``stored_bytes`` the serialised form the
    store writes (safetensors with metadata, ``CompressedContext.to_bytes``).
    """
    from ..generation import Generator
    from ..models import load_base_model
    from .qa import _free

    if not ks or min(ks) < 1 or not tokens or min(tokens) < 1:
        raise ValueError("--ks and --tokens need positive integers")
    bad = [m for m in modes if m not in ("kv", "embedding")]
    if bad or not modes:
        raise ValueError(f"unknown mode(s) {bad}; use kv and/or embedding")
    base = load_base_model(device=device, dtype=dtype)
    from .report import environment

    env = environment(base)
    tok = base.tokenizer
    texts, source = bench_source(data)
    chunks: dict[int, tuple[str, int]] = {}
    full: dict[int, dict[str, int]] = {}
    gen = Generator(base)
    for j, T in enumerate(tokens):
        text = make_chunks(texts, tok, 1, T, offset=j)[0]
        ref = gen.context_from_text(text)
        chunks[T] = (text, ref.source_tokens)
        full[T] = {"nbytes": ref.nbytes, "stored_bytes": len(ref.to_bytes()), "tokens": ref.source_tokens,
                   "text_bytes": len(text.encode("utf-8"))}
    del gen, base
    _free()
    rows = []
    from tqdm.auto import tqdm

    for mode in modes:
        for k in tqdm(ks, desc=f"bench disk {mode}", disable=not progress, leave=False):
            lc = load_compressor(None, k=k, mode=mode, device=device, dtype=dtype)
            for T in tokens:
                text, n_tok = chunks[T]
                ctx = lc.compressor.compress([text], truncate=True)[0]
                stored = len(ctx.to_bytes())
                rows.append({"mode": mode, "k": k, "chunk_tokens": T, "source_tokens": n_tok,
                             "dtype": str(ctx.dtype).replace("torch.", ""), "nbytes": ctx.nbytes,
                             "stored_bytes": stored, "full_kv_nbytes": full[T]["nbytes"],
                             "full_kv_stored_bytes": full[T]["stored_bytes"],
                             "ratio_vs_full_kv": full[T]["stored_bytes"] / stored,
                             "text_bytes": full[T]["text_bytes"]})
            del lc
            _free()
    return {"kind": "bench-disk", "rows": rows, "full_kv": {str(t): v for t, v in full.items()},
            "config": {"ks": list(ks), "modes": list(modes), "chunk_tokens": list(tokens), "text_source": source,
                       "note": "untrained compressors: sizes depend on shapes only", **env}}


def bench_store(n: int = 200, *, k: int = 16, tokens: int = 512, dtype: str = "float32",
                directory: str | None = None) -> dict[str, Any]:
    """Run ``compressor_plugin.evaluation.bench_store.bench_hit_path`` with the arguments it accepts.

    Raises:
        RuntimeError: that module is not part of this installation.
    """
    import importlib
    import inspect

    import torch

    try:
        mod = importlib.import_module("compressor_plugin.evaluation.bench_store")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.endswith("bench_store"):
            raise RuntimeError("bench store needs compressor_plugin.evaluation.bench_store, "
                               "which this installation does not have") from exc
        raise
    fn = getattr(mod, "bench_hit_path", None)
    if fn is None:
        raise RuntimeError("compressor_plugin.evaluation.bench_store has no bench_hit_path()")
    offered = {"n": n, "k": k, "source_tokens": tokens, "dtype": getattr(torch, dtype), "directory": directory}
    params = inspect.signature(fn).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {name: v for name, v in offered.items() if (accepts_any or name in params) and v is not None}
    result = fn(**kwargs)
    return {"kind": "bench-store", "result": result, "config": {k2: str(v) for k2, v in kwargs.items()}}


def rag_table(result: dict[str, Any]) -> str:
    """Markdown table of a ``bench rag`` result."""
    from .report import markdown_table

    rows = [[r["n_chunks"], r["chunk_tokens"], r["system"], r["ttft_s_median"] * 1e3, r["e2e_s_median"] * 1e3,
             r["prompt_tokens"], r["source_tokens"], r["peak_mem_bytes"] / 2**20, r.get("ttft_speedup_vs_full")]
            for r in result["rows"]]
    return markdown_table(["n", "T", "system", "TTFT ms", "e2e ms", "prompt tok", "source tok", "peak MiB",
                           "TTFT speed-up"], rows, digits=2)


def compress_table(result: dict[str, Any]) -> str:
    """Markdown table of a ``bench compress`` result."""
    from .report import markdown_table

    rows = [[r["batch_size"], r["chunk_tokens"], r["chunks_per_s"], r["tokens_per_s"], r["achieved_tflops"],
             r["fraction_of_peak"], r["api_chunks_per_s"], r["peak_mem_bytes"] / 2**20] for r in result["rows"]]
    return markdown_table(["batch", "T", "chunks/s", "tokens/s", "TFLOP/s", "of peak", "API chunks/s", "peak MiB"],
                          rows, digits=3)


def disk_table(result: dict[str, Any]) -> str:
    """Markdown table of a ``bench disk`` result."""
    from .report import markdown_table

    rows = [[r["mode"], r["k"], r["chunk_tokens"], r["dtype"], r["stored_bytes"], r["full_kv_stored_bytes"],
             r["ratio_vs_full_kv"], r["text_bytes"]] for r in result["rows"]]
    return markdown_table(["mode", "k", "T", "dtype", "stored bytes", "full K/V bytes", "x smaller", "text bytes"],
                          rows, digits=1)


# ---------------------------------------------------------------------- bench generate
GENERATE_SYSTEMS = ("engine-text-static", "engine-text-dynamic", "engine-chunks-static", "engine-chunks-dynamic",
                    "hf-dynamic", "hf-static")


def bench_generate(
    n_chunks: int = 4,
    tokens: int = 512,
    new_tokens: int = 64,
    *,
    repeats: int = 3,
    systems: Sequence[str] = GENERATE_SYSTEMS,
    checkpoint: str | None = "default",
    k: int | None = None,
    mode: str = "kv",
    device: Any = None,
    dtype: Any = None,
    data: str | None = None,
    compile: bool | None = None,
    progress: bool = True,
    log: Log | None = _stderr,
) -> dict[str, Any]:
    """Decode speed and time to first token: the engine against plain transformers ``generate``.

    One RAG prompt (``plain`` layout) over ``n_chunks`` chunks of ``tokens`` tokens, answered
    with exactly ``new_tokens`` greedy tokens (end-of-sequence ignored) by each system:

    * ``engine-text-*``: :meth:`CompressionEngine.generate` with the chunk texts in the prompt;
    * ``engine-chunks-*``: the same prompt with the chunks as markers of stored compressed
      chunks (store hits: lookup, injection, prefill, decoding);
    * ``*-static`` / ``*-dynamic``: the engine's generator with ``cache="static"`` (compiled
      CUDA-graph decode step on a GPU unless ``compile=False``) or ``cache="dynamic"``;
    * ``hf-dynamic``: ``model.generate`` of a plain copy of the base model on the text prompt;
    * ``hf-static``: the same with ``cache_implementation="static"`` (transformers compiles
      the decode step itself on a GPU).

    Every system runs once with ``new_tokens`` and once with one new token as a warm-up (this
    is when compilation happens), then ``repeats`` rounds in which the systems take turns (a
    one-token and a full answer each). ``ttft_ms`` is the median wall time of a one-token
    answer (prompt to first token, including marker resolution for the engine);
    ``ms_per_token`` is ``(median full time - ttft) / (new_tokens - 1)``; the ``*_min``
    figures use the fastest runs instead (steadier on a busy machine).
    """
    import torch

    from ..engine import CompressionEngine
    from ..generation import GenerationConfig, Generator
    from ..models import load_base_model
    from ..store import ContextStore
    from .report import environment

    log = log or (lambda _m: None)
    unknown = [s for s in systems if s not in GENERATE_SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; choose from {', '.join(GENERATE_SYSTEMS)}")
    if repeats < 1 or new_tokens < 2 or n_chunks < 1 or tokens < 1:
        raise ValueError("repeats and n_chunks must be >= 1, new_tokens >= 2, tokens >= 1")
    ckpt, kk, mode, note = _parse_default_checkpoint(checkpoint, k, mode, log)
    lc = load_compressor(ckpt, k=kk, mode=mode, device=device, dtype=dtype)
    comp = lc.compressor
    comp.match_adapter_dtype()  # as CompressionEngine.from_pretrained loads it
    base = comp.base
    tok = base.tokenizer
    if tokens > comp.config.max_length:
        raise ValueError(f"--tokens {tokens} exceeds the compressor's max_length {comp.config.max_length}")
    texts, source = bench_source(data)
    chunks = make_chunks(texts, tok, n_chunks, tokens, offset=1)
    prompt = qa_prompt("plain", RAG_QUESTION, tok)
    text_prompt = "".join(prompt.segments(chunks))
    tmp = tempfile.TemporaryDirectory(prefix="bench-generate-store-")
    engine = CompressionEngine(comp, ContextStore(tmp.name), anchors=0)  # decode speed of the K/V alone
    chunk_prompt = prompt.before + "".join(engine.mark(chunks)) + prompt.after
    generators = {"static": Generator(base, comp, cache="static", compile=compile),
                  "dynamic": Generator(base, comp, cache="dynamic")}
    plain = None
    if any(s.startswith("hf-") for s in systems):
        plain = load_base_model(device=base.device, dtype=base.dtype)
    dev = base.device
    ids = tok(text_prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(dev)

    def engine_run(kind: str, text: str) -> Callable[[int], int]:
        def run(n: int) -> int:
            engine.generator = generators[kind]
            res = engine.generate(text, GenerationConfig(max_new_tokens=n, ignore_eos=True))
            return len(res.generation.token_ids)
        return run

    def hf_run(static: bool) -> Callable[[int], int]:
        extra = {"cache_implementation": "static"} if static else {}

        def run(n: int) -> int:
            out = plain.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, pad_token_id=tok.pad_token_id or 0, **extra)
            return int(out.shape[1] - ids.shape[1])
        return run

    runs = {"engine-text-static": engine_run("static", text_prompt),
            "engine-text-dynamic": engine_run("dynamic", text_prompt),
            "engine-chunks-static": engine_run("static", chunk_prompt),
            "engine-chunks-dynamic": engine_run("dynamic", chunk_prompt),
            "hf-dynamic": hf_run(False), "hf-static": hf_run(True)}
    prompt_tokens = {"text": int(ids.shape[1]),
                     "chunks": engine.generate(chunk_prompt, max_new_tokens=1).generation.prompt_tokens}
    from tqdm.auto import tqdm

    firsts: dict[str, list[float]] = {s: [] for s in systems}
    fulls: dict[str, list[float]] = {s: [] for s in systems}
    try:
        for system in systems:  # warm-up (compilation happens here)
            got = runs[system](new_tokens)
            runs[system](1)
            if got != new_tokens:
                raise RuntimeError(f"bench generate: {system} made {got} tokens, not {new_tokens}")
        # the systems take turns in every repeat, so a busy machine slows them alike
        for _ in tqdm(range(repeats), desc="bench generate", unit="round", disable=not progress, leave=False):
            for system in systems:
                _sync(dev)
                t0 = time.perf_counter()
                runs[system](1)
                _sync(dev)
                firsts[system].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                runs[system](new_tokens)
                _sync(dev)
                fulls[system].append(time.perf_counter() - t0)
    finally:
        engine.store.close()
        tmp.cleanup()
    rows = []
    for system in systems:
        ttft, full = statistics.median(firsts[system]), statistics.median(fulls[system])
        compiled = (system.endswith("static") and dev.type == "cuda"
                    and (system.startswith("hf") or generators["static"].compile))
        rows.append({"system": system, "prompt": "chunks" if "chunks" in system else "text",
                     "prompt_tokens": prompt_tokens["chunks" if "chunks" in system else "text"],
                     "new_tokens": new_tokens, "compiled": bool(compiled),
                     "ttft_ms": ttft * 1e3, "ttft_ms_min": min(firsts[system]) * 1e3,
                     "total_ms": full * 1e3, "total_ms_min": min(fulls[system]) * 1e3,
                     "ms_per_token": (full - ttft) / (new_tokens - 1) * 1e3,
                     "ms_per_token_min": (min(fulls[system]) - min(firsts[system])) / (new_tokens - 1) * 1e3})
    ref = {r["system"]: r["ms_per_token"] for r in rows}
    for r in rows:
        r["decode_vs_hf_dynamic"] = (r["ms_per_token"] / ref["hf-dynamic"]) if ref.get("hf-dynamic") else None
    env = environment(base)
    return {"kind": "bench-generate", "rows": rows,
            "config": {"n_chunks": n_chunks, "chunk_tokens": tokens, "new_tokens": new_tokens, "repeats": repeats,
                       "question": RAG_QUESTION, "layout": "plain", "checkpoint": ckpt or "untrained", "k": kk,
                       "mode": mode, "note": note, "text_source": source, "device": str(dev),
                       "dtype": str(base.dtype), "compile": generators["static"].compile,
                       "timing": "systems take turns in each repeat after a warm-up; medians (and fastest runs); "
                                 "ttft = wall time of a one-token answer; ms_per_token = (full answer - ttft) / "
                                 "(new_tokens - 1); eos ignored",
                       **env}}


def generate_table(result: dict[str, Any]) -> str:
    """Markdown table of a ``bench generate`` result."""
    from .report import markdown_table

    rows = [[r["system"], r["prompt_tokens"], "yes" if r["compiled"] else "no", r["ttft_ms"], r["ms_per_token"],
             r["ms_per_token_min"], r["total_ms"], r.get("decode_vs_hf_dynamic")] for r in result["rows"]]
    return markdown_table(["system", "prompt positions", "compiled", "TTFT ms", "ms / token", "ms / token (fastest runs)",
                           f"{result['config']['new_tokens']} tokens ms", "decode vs hf-dynamic"], rows, digits=2)


def plot_generate(result: dict[str, Any], output: str | os.PathLike) -> Any:
    """Bar charts of ms per token and time to first token per system, from a ``bench generate`` result."""
    from .plots import _pyplot, _save

    plt = _pyplot()
    rows = result["rows"]
    names = [r["system"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "ms_per_token", "ms per new token"), (axes[1], "ttft_ms", "time to first token (ms)")):
        vals = [r[key] for r in rows]
        colors = ["tab:blue" if n.startswith("engine") else "tab:gray" for n in names]
        ax.barh(names, vals, color=colors)
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
        ax.set_xlabel(label)
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    cfg = result["config"]
    dev = cfg.get("cuda_device") or cfg.get("device", "")
    fig.suptitle(f"decode speed: {cfg['n_chunks']} x {cfg['chunk_tokens']}-token chunks, {cfg['new_tokens']} new "
                 f"tokens ({dev}, {cfg['dtype'].replace('torch.', '')})", fontsize=10)
    fig.tight_layout()
    return _save(fig, output)


__all__ = ["bench_rag", "bench_compress", "bench_disk", "bench_store", "bench_generate",
           "rag_table", "compress_table", "disk_table", "generate_table", "plot_generate", "MemoryProbe"]
