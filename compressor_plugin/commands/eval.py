"""``compressor-plugin eval``: QA and regeneration evaluations, and plots of their results."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable


#: Largest result a gzip-compressed ``--reference`` may expand to (a small file can hold a huge one).
MAX_REFERENCE_BYTES = 1 << 30


def read_result_bytes(path: Path) -> bytes:
    """A result file's bytes, gzip-compressed (docs/data keeps them so) or plain.

    Raises:
        ValueError: a compressed file that would expand past :data:`MAX_REFERENCE_BYTES`.
        OSError, EOFError: unreadable, or a broken gzip stream.
    """
    import gzip

    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return path.read_bytes()
    with gzip.open(path, "rb") as g:
        raw = g.read(MAX_REFERENCE_BYTES + 1)
    if len(raw) > MAX_REFERENCE_BYTES:
        raise ValueError(f"expands past {MAX_REFERENCE_BYTES} bytes; not a result file")
    return raw


def number_list(text: str, cast: Callable[[str], float], lo: float, hi: float | None, what: str) -> list:
    """``"a,b,c"`` -> ``[cast(a), cast(b), cast(c)]``, each in ``[lo, hi]`` (``hi=None``: no upper bound).

    Raises:
        argparse.ArgumentTypeError: not comma-separated numbers of that type, none, or one out of range.
    """
    kind = "integers" if cast is int else "numbers"
    try:
        vals = [cast(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated {kind}, got {text!r}") from exc
    if not vals or min(vals) < lo or (hi is not None and max(vals) > hi):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return vals


def int_list(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (argparse type)."""
    return number_list(text, int, 1, None, "positive integers")


def share_list(text: str) -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]``: sentence-window shares (argparse type)."""
    return number_list(text, float, 0, 1, "shares between 0 and 1")


def budget_list(text: str) -> list[int]:
    """``"0,16,32"`` -> ``[0, 16, 32]``: anchor token budgets (argparse type; 0 allowed)."""
    from ..anchors import MAX_ANCHOR_TOKENS

    return number_list(text, int, 0, MAX_ANCHOR_TOKENS, f"budgets between 0 and {MAX_ANCHOR_TOKENS}")


def examples_arg(text: str) -> int | None:
    """``--examples``: a count of at least 0, or ``all`` (None)."""
    if text.strip().lower() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', not {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'all', not {text!r}")
    return n


def str_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """argparse type for a comma-separated list drawn from ``choices``."""
    def parse(text: str) -> list[str]:
        vals = [x.strip() for x in text.split(",") if x.strip()]
        bad = [v for v in vals if v not in choices]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)} (got {text!r})")
        return vals
    return parse


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype``, ``--batch-size``, ``--no-progress``."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batched decode (default 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_compressor_args(p: argparse.ArgumentParser) -> None:
    """``--checkpoint ...``, ``--k``, ``--mode``."""
    p.add_argument("--checkpoint", nargs="+", default=[], metavar="DIR_OR_NAME",
                   help="compressor checkpoint folders or shipped names (kv-k16, kv-k4, ...), one system each")
    p.add_argument("--k", type=int, default=None,
                   help="also evaluate an UNTRAINED compressor with k compressed tokens (smoke tests)")
    p.add_argument("--mode", choices=["kv", "embedding"], default="kv", help="mode of the untrained compressor")


def register(sub: argparse._SubParsersAction) -> None:
    from ..evaluation.qa import SYSTEM_GROUPS
    from ..prompts import QA_LAYOUTS

    ev = sub.add_parser("eval", help="evaluate compressors: QA accuracy, regeneration, plots",
                        description="Evaluate compressors against text baselines on JSONL data.")
    esub = ev.add_subparsers(dest="eval_command", metavar="EVAL")
    esub.required = True

    qa = esub.add_parser(
        "qa", help="extractive QA: full / none / truncate / compressed / full-tuned systems",
        description="Answer a seeded subset of questions with every system (greedy, 24 new tokens) and score "
                    "SQuAD EM/F1. Prints a markdown table; writes JSON with --output.")
    qa.add_argument("--data", required=True, help="QA JSONL file (context, question, answers)")
    qa.add_argument("--limit", type=int, default=None, help="number of questions (seeded sample; default all)")
    qa.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_compressor_args(qa)
    qa.add_argument("--full-tuned", default=None, metavar="ADAPTER_DIR",
                    help="peft LoRA adapter folder: adds the full-tuned system")
    qa.add_argument("--layouts", type=str_list(QA_LAYOUTS), default=list(QA_LAYOUTS),
                    help=f"prompt layouts for the full systems (default {','.join(QA_LAYOUTS)})")
    qa.add_argument("--systems", type=str_list(SYSTEM_GROUPS), default=None,
                    help=f"system groups to run (default all): {','.join(SYSTEM_GROUPS)}")
    qa.add_argument("--chunks", type=int, default=1,
                    help="contexts per question: the gold one among CHUNKS-1 seeded distractors (default 1)")
    qa.add_argument("--max-new-tokens", type=int, default=24, help="answer length limit (default 24)")
    qa.add_argument("--anchors", type=budget_list, default=[0], metavar="N[,N...]",
                    help="anchor token budgets: each compressed system is also evaluated with up to N tokens of "
                         "its chunk's exact names, numbers and dates beside the K/V, as {mode}-k{K}+a{N} "
                         "(default 0: none)")
    qa.add_argument("--question-anchors", action="store_true",
                    help="also evaluate anchors chosen for each question as the engine chooses them (+qN systems: "
                         "spans from the sentences that share words with the question first; with --chunks > 1 the "
                         "prompt's budget is shared by relevance, and +qN-unshared keeps N per chunk), at each "
                         "budget N > 0")
    qa.add_argument("--window-shares", type=share_list, default=None, metavar="S[,S...]",
                    help="with --question-anchors: shares of the budget the question's best sentence may take "
                         "verbatim before the spans, each evaluated as +qNw{100*S} (0: spans only, +qN); "
                         "default: the engine's")
    qa.add_argument("--anchor-context", type=int, default=None, metavar="W",
                    help="words kept before each number or date in anchors ('born in 1962'; default "
                         "compressor_plugin.anchors.DEFAULT_LEFT_CONTEXT)")
    qa.add_argument("--examples", type=examples_arg, default=5, metavar="N|all",
                    help="per-question answers kept per system in the JSON (default 5; 'all' lets a later run "
                         "use this one as its --reference)")
    qa.add_argument("--reference", default=None, metavar="RESULT.json",
                    help="an earlier result written with --examples all and the full systems, on the same "
                         "questions: agreement is measured against its full-text answers when this run has "
                         "no full system (run full text once, compressors many times)")
    add_model_args(qa)
    qa.add_argument("--output", default=None, help="result JSON file")
    qa.add_argument("--plot", default=None, help="also plot F1 vs compression ratio to this PNG")
    qa.set_defaults(func=_qa)

    rg = esub.add_parser(
        "regen", help="regenerate texts from their compressed form (ROUGE-L, BLEU)",
        description="Compress each text, regenerate it greedily from the compressed form and score ROUGE-L F and "
                    "BLEU, overall and by source length. Includes the exact-K/V reference system full-kv.")
    rg.add_argument("--data", required=True, help="corpus JSONL ('text') or QA JSONL ('context')")
    rg.add_argument("--limit", type=int, default=None, help="number of texts (seeded sample; default all)")
    rg.add_argument("--seed", type=int, default=0)
    add_compressor_args(rg)
    rg.add_argument("--max-tokens", type=int, default=512, help="cut texts to this many tokens first (default 512)")
    rg.add_argument("--no-full-kv", action="store_true", help="skip the full-kv reference system")
    add_model_args(rg)
    rg.add_argument("--output", default=None, help="result JSON file")
    rg.add_argument("--plot", default=None, help="also plot ROUGE-L by length to this PNG")
    rg.set_defaults(func=_regen)

    mi = esub.add_parser(
        "make-invented", help="write a QA file about invented paragraphs (facts no model can know)",
        description="Generate paragraphs of made-up names, numbers, dates and places, with questions whose "
                    "answers are spans of the text, as QA JSONL for 'eval qa --data'. Seeded: the same "
                    "arguments always write the same file.")
    mi.add_argument("--output", required=True, help="JSONL file to write")
    mi.add_argument("--paragraphs", type=int, default=50, help="number of paragraphs (default 50)")
    mi.add_argument("--questions-per-paragraph", type=int, default=3, help="1..7 (default 3)")
    mi.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    mi.add_argument("--paragraphs-per-chunk", type=int, default=1,
                    help="join this many consecutive paragraphs into one context (default 1); three make "
                         "chunks of about 350 tokens with more facts than an anchor budget can spell out")
    mi.set_defaults(func=_make_invented)

    pl = esub.add_parser("plot", help="plot result JSON files (eval qa/regen, bench rag/compress)",
                         description="eval qa results: F1 vs compression ratio (several files share one plot); "
                                     "eval regen: ROUGE-L by length; bench rag: TTFT vs chunks; "
                                     "bench compress: tokens/s vs batch size.")
    pl.add_argument("inputs", nargs="+", metavar="IN.json")
    pl.add_argument("--output", required=True, help="PNG file")
    pl.set_defaults(func=_plot)


def _make_invented(args: argparse.Namespace) -> int:
    from ..evaluation.invented import write_invented_qa

    path = write_invented_qa(args.output, args.paragraphs, seed=args.seed,
                             questions_per_paragraph=args.questions_per_paragraph,
                             paragraphs_per_chunk=args.paragraphs_per_chunk)
    n = sum(1 for _ in open(path, encoding="utf-8"))
    print(f"wrote {n} questions about {args.paragraphs} invented paragraphs to {path}")
    return 0


def _check_common(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be positive")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be positive")
    if args.k is not None and not 1 <= args.k <= 512:
        raise ValueError("--k must be between 1 and 512")


def _finish(result: dict, table: str, args: argparse.Namespace, plot: Callable[[], object] | None) -> int:
    from ..evaluation.report import write_json

    print(table)
    if args.output:
        path = write_json(args.output, result)
        print(f"\nwrote {path}", file=sys.stderr)
    if args.plot and plot is not None:
        print(f"wrote {plot()}", file=sys.stderr)
    return 0


def _qa(args: argparse.Namespace) -> int:
    from ..evaluation.plots import plot_qa
    from ..evaluation.qa import run_qa_eval
    from ..evaluation.report import qa_table

    _check_common(args)
    if args.chunks < 1:
        raise ValueError("--chunks must be positive")
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be positive")
    reference = None
    if args.reference is not None:
        try:
            reference = json.loads(read_result_bytes(Path(args.reference)).decode("utf-8"))
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"--reference {args.reference}: not a readable result JSON ({e})") from e
    result = run_qa_eval(args.data, limit=args.limit, seed=args.seed, checkpoints=args.checkpoint, k=args.k,
                         mode=args.mode, full_tuned=args.full_tuned, layouts=args.layouts, systems=args.systems,
                         device=args.device, dtype=args.dtype, batch_size=args.batch_size, chunks=args.chunks,
                         max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                         anchors=args.anchors, anchor_context=args.anchor_context,
                         question_anchors=args.question_anchors,
                         window_shares=args.window_shares, keep_examples=args.examples, reference=reference)
    return _finish(result, qa_table(result), args, lambda: plot_qa([result], args.plot))


def _regen(args: argparse.Namespace) -> int:
    from ..evaluation.plots import plot_regen
    from ..evaluation.regen import run_regen_eval
    from ..evaluation.report import regen_table

    _check_common(args)
    result = run_regen_eval(args.data, limit=args.limit, seed=args.seed, checkpoints=args.checkpoint, k=args.k,
                            mode=args.mode, max_tokens=args.max_tokens, full_kv=not args.no_full_kv,
                            device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                            progress=not args.no_progress)
    if not result["systems"]:
        raise ValueError("nothing to evaluate: give --checkpoint or --k, or drop --no-full-kv")
    return _finish(result, regen_table(result), args, lambda: plot_regen([result], args.plot))


def _plot(args: argparse.Namespace) -> int:
    from ..evaluation.plots import plot_files

    print(f"wrote {plot_files(args.inputs, args.output)}")
    return 0
