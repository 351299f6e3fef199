"""Plots of evaluation and benchmark results (matplotlib, Agg backend: no display needed).

* ``eval qa`` results: F1 against compression ratio (source tokens per context token in the
  prompt), one point per system, one colour per result file; ``full`` and ``none`` as
  horizontal reference lines.
* ``eval regen`` results: ROUGE-L F by source-length bucket, one line per system.
* ``bench rag`` results: time to first token against the number of chunks, one panel per chunk length.
* ``bench compress`` results: tokens/s against batch size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .report import read_json


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise RuntimeError("plots need matplotlib: pip install 'compressor-plugin[eval]'") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, output: str | os.PathLike) -> Path:
    out = Path(output).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def _label(result: Mapping[str, Any], i: int) -> str:
    data = result.get("data")
    return f"{Path(data).stem} (n={result.get('n')})" if data else f"run {i + 1}"


def headline_systems(result: Mapping[str, Any]) -> list[str]:
    """Systems worth a point: those not already summarised by a ``best_of`` system."""
    systems = result["systems"]
    parts = {p for s in systems.values() for p in s.get("best_of", []) or []}
    return [n for n in systems if n not in parts]


def _marker(system: str) -> str:
    if system.startswith("truncate"):
        return "s"
    if system.startswith("embedding"):
        return "^"
    if system.startswith("full"):
        return "*"
    return "o"


def plot_qa(results: Sequence[Mapping[str, Any]], output: str | os.PathLike) -> Path:
    """F1 vs compression ratio for one or more ``eval qa`` results.

    Markers: circle = kv compressor, triangle = embedding compressor, square = truncation,
    star = full-context systems (``full-tuned``).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    any_point = False
    for i, res in enumerate(results):
        c = colours[i % len(colours)]
        systems = res["systems"]
        xs, ys, names = [], [], []
        for name in headline_systems(res):
            s = systems[name]
            if name in ("full", "none"):
                continue
            ratio, f1 = s.get("compression_ratio"), s.get("f1")
            if ratio is None or f1 is None:
                continue
            xs.append(ratio)
            ys.append(f1)
            names.append(name)
        for x, y, nm in zip(xs, ys, names):
            ax.scatter([x], [y], color=c, marker=_marker(nm), zorder=3)
        # one label per point; systems that landed on the same point share it
        spots: dict[tuple[float, float], list[str]] = {}
        for x, y, nm in zip(xs, ys, names):
            spots.setdefault((round(x, 6), round(y, 6)), []).append(nm)
        for (x, y), nms in spots.items():
            ax.annotate(", ".join(nms), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color=c)
        ax.scatter([], [], color=c, label=_label(res, i))
        any_point = any_point or bool(xs)
        for ref, style in (("full", "--"), ("none", ":")):
            if ref in systems and systems[ref].get("f1") is not None:
                ax.axhline(systems[ref]["f1"], color=c, linestyle=style, linewidth=1,
                           label=f"{ref} ({_label(res, i)})")
    if any_point:
        ax.set_xscale("log")
    ax.set_xlabel("compression ratio (source tokens / context tokens in the prompt)")
    ax.set_ylabel("F1")
    ax.set_ylim(bottom=0)
    ax.set_title("QA F1 vs compression")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, output)


def plot_regen(results: Sequence[Mapping[str, Any]], output: str | os.PathLike) -> Path:
    """ROUGE-L F by source-length bucket for ``eval regen`` results."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    buckets = ["<=96", "<=192", "<=288", "<=384", "<=512", ">512"]
    for i, res in enumerate(results):
        for name, s in res["systems"].items():
            by = s.get("by_length", {})
            xs = [b for b in buckets if b in by]
            ax.plot(xs, [by[b]["rouge_l"] for b in xs], marker="o",
                    label=name if len(results) == 1 else f"{name} ({_label(res, i)})")
    ax.set_xlabel("source tokens")
    ax.set_ylabel("ROUGE-L F")
    ax.set_ylim(0, 1.05)
    ax.set_title("Regeneration quality by text length")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, output)


def plot_rag(result: Mapping[str, Any], output: str | os.PathLike) -> Path:
    """TTFT (median, ms) vs number of chunks, one panel per chunk length, from a ``bench rag`` result."""
    plt = _pyplot()
    rows = result["rows"]
    lengths = sorted({r["chunk_tokens"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.8), squeeze=False, sharey=True)
    for ax, T in zip(axes[0], lengths):
        for system in dict.fromkeys(r["system"] for r in rows):
            pts = sorted((r["n_chunks"], r["ttft_s_median"] * 1e3) for r in rows
                         if r["system"] == system and r["chunk_tokens"] == T)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
        ax.set_title(f"{T}-token chunks")
        ax.set_xlabel("chunks")
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("time to first token (ms)")
    axes[0][0].legend(fontsize=8)
    dev = result.get("config", {}).get("cuda_device") or result.get("config", {}).get("device", "")
    fig.suptitle(f"RAG time to first token ({dev})", fontsize=10)
    return _save(fig, output)


def plot_compress(result: Mapping[str, Any], output: str | os.PathLike) -> Path:
    """Compression tokens/s vs batch size from a ``bench compress`` result."""
    plt = _pyplot()
    rows = sorted(result["rows"], key=lambda r: r["batch_size"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["batch_size"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (chunks)")
    ax.set_ylabel("tokens/s compressed")
    ax.set_title(f"Compression throughput ({rows[0]['chunk_tokens'] if rows else '?'}-token chunks)")
    ax.grid(True, alpha=0.3)
    return _save(fig, output)


def plot_files(paths: Sequence[str | os.PathLike], output: str | os.PathLike) -> Path:
    """Plot result JSON files of one kind (several ``eval qa`` / ``eval regen`` files share a plot).

    Raises:
        ValueError: no files, files of different kinds, or a kind that has no plot.
    """
    if not paths:
        raise ValueError("give at least one result JSON file")
    results = [read_json(p) for p in paths]
    kinds = {r.get("kind", "eval-qa" if "systems" in r else None) for r in results}
    if len(kinds) != 1:
        raise ValueError(f"cannot plot results of different kinds together: {sorted(map(str, kinds))}")
    kind = kinds.pop()
    if kind == "eval-qa":
        return plot_qa(results, output)
    if kind == "eval-regen":
        return plot_regen(results, output)
    if len(results) != 1:
        raise ValueError(f"{kind} results are plotted one file at a time")
    if kind == "bench-rag":
        return plot_rag(results[0], output)
    if kind == "bench-compress":
        return plot_compress(results[0], output)
    raise ValueError(f"no plot for results of kind {kind!r}")
