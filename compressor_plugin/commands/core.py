"""``compressor-plugin compress``: compress text and print statistics."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
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
