"""The ``compressor-plugin`` command line: one command with sub-commands.

Each sub-command lives in a module of :mod:`compressor_plugin.commands` that defines
``register(subparsers)``; heavy imports happen inside the handlers so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Before torch is imported (it starts its OpenMP pool on import): waiting threads sleep instead of
# spinning, which keeps a small or shared CPU fast. A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from typing import Sequence

#: Modules whose ``register(subparsers)`` adds sub-commands, in help order.
COMMAND_MODULES = (
    "compressor_plugin.commands.core",
    "compressor_plugin.commands.train",
    "compressor_plugin.commands.cache",
    "compressor_plugin.commands.cache_build",
    "compressor_plugin.commands.eval",
    "compressor_plugin.commands.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compressor-plugin",
        description="Learned prompt compression for RAG (500xCompressor): compress chunks into K/V once, "
                    "cache them on disk, answer from them with a local Hugging Face model.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
