"""``compressor-plugin demo`` (the main job) and ``compressor-plugin compress``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="answer questions from compressed, cached chunks and from full text, side by side",
                       description="Compress twelve bundled SQuAD paragraphs into the store (once; later runs find them "
                                   "there), retrieve the top paragraphs for each question with BM25, and answer with the "
                                   "same frozen model from compressed K/V and from the full text. Prints answers, prompt "
                                   "tokens and timings.")
    d.add_argument("--checkpoint", default="default", help="compressor checkpoint folder or shipped name (default: kv-k16)")
    d.add_argument("--store", default=None, help="store folder (default: the user cache's store)")
    d.add_argument("--questions", type=int, default=4, help="how many bundled questions to answer (1-6)")
    d.add_argument("--top-k", type=int, default=2, help="paragraphs retrieved per question")
    d.add_argument("--device", default=None)
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.set_defaults(func=_demo)

    p = sub.add_parser("compress", help="compress text (argument, file or stdin) and print statistics",
                       description="Compress text into k compressed tokens with a compressor checkpoint and print "
                                   "token counts, compression ratio, bytes and timing. With --regenerate, also decode "
                                   "the text back from its compressed form.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text to compress")
    src.add_argument("--file", help="text file to compress ('-' for stdin)")
    p.add_argument("--checkpoint", default="default", help="checkpoint folder or shipped name (default: kv-k16)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--truncate", action="store_true", help="keep the first max_length tokens of longer text")
    p.add_argument("--regenerate", action="store_true", help="also regenerate the text from its compressed form")
    p.add_argument("--output", help="write the compressed context (safetensors bytes) to this file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_compress)


def _read_text(args: argparse.Namespace) -> str:
    if args.text is not None:
        return args.text
    if args.file == "-":
        return sys.stdin.read()
    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text: {exc}") from exc


def _compress(args: argparse.Namespace) -> int:
    from ..compressor import Compressor
    from ..generation import Generator
    from ..prompts import regen_segments

    text = _read_text(args)
    if not text.strip():
        raise ValueError("the text is empty; there is nothing to compress")
    comp = Compressor.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype)
    t0 = time.perf_counter()
    ctx = comp.compress([text], truncate=args.truncate)[0]
    seconds = time.perf_counter() - t0
    stats = {"checkpoint": args.checkpoint, "mode": ctx.mode, "k": ctx.k, "source_tokens": ctx.source_tokens,
             "compression_ratio": round(ctx.compression_ratio, 2), "bytes": ctx.nbytes,
             "seconds": round(seconds, 4), "device": str(comp.device)}
    if args.output:
        Path(args.output).write_bytes(ctx.to_bytes())
        stats["written"] = args.output
    if args.regenerate:
        gen = Generator(comp.base, comp)
        res = gen.generate(regen_segments(ctx), max_new_tokens=ctx.source_tokens + 16)
        stats["regenerated"] = res.text
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        for key, val in stats.items():
            print(f"{key:>18}: {val}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ..compressor import shipped_checkpoints
    from ..demo import format_report, run_demo
    from ..engine import CompressionEngine
    from ..store import ContextStore

    if args.checkpoint == "default" and "kv-k16" not in shipped_checkpoints():
        raise FileNotFoundError("the shipped compressor kv-k16 is missing from this installation")
    from ..models import default_model_converted

    if not default_model_converted():
        print("First run: converting the default model into the local cache (once, about 20 s)...", file=sys.stderr)
    store = ContextStore(args.store) if args.store else ContextStore()
    engine = CompressionEngine.from_pretrained(args.checkpoint, store=store, device=args.device)
    rep = run_demo(engine, questions=max(1, min(args.questions, 6)), top_k=args.top_k)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(format_report(rep, args.checkpoint, str(store.directory)))
    return 0
