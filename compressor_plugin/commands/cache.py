"""``compressor-plugin cache``: inspect and maintain a store of compressed chunks.

Actions: ``cache stats``, ``cache verify`` and ``cache clear``, each with ``--store DIR``
(default: the default store folder) and ``--json``.

Other command modules add actions under ``cache`` with :func:`cache_subparsers`, which
returns the ``cache`` parser's sub-parsers whichever module registers first::

    from compressor_plugin.commands.cache import cache_subparsers

    def register(sub):
        p = cache_subparsers(sub).add_parser("build", help="...")
        p.set_defaults(func=_build)

Functions appended to :data:`EXTRA_REGISTRARS` are also called with those sub-parsers when
the ``cache`` parser is created.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

#: Extra ``fn(cache_actions)`` callables run when the ``cache`` parser is created.
EXTRA_REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = []

_ACTIONS_ATTR = "_compressor_plugin_cache_actions"


def cache_subparsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The sub-parsers of the ``cache`` command in ``sub``, creating the command if needed."""
    parser = sub.choices.get("cache")
    if parser is None:
        parser = sub.add_parser(
            "cache", help="inspect and maintain a store of compressed chunks",
            description="Inspect and maintain an on-disk store of compressed chunks (see docs/store.md).")
        actions = parser.add_subparsers(dest="cache_command", metavar="ACTION")
        actions.required = True
        setattr(parser, _ACTIONS_ATTR, actions)
        for fn in EXTRA_REGISTRARS:
            fn(actions)
    return getattr(parser, _ACTIONS_ATTR)


def add_store_argument(p: argparse.ArgumentParser) -> None:
    """``--store DIR`` with the default store folder as default."""
    p.add_argument("--store", metavar="DIR", default=None,
                   help="store folder (default: $COMPRESSOR_PLUGIN_HOME/store or ~/.cache/compressor_plugin/store)")


def register(sub: argparse._SubParsersAction) -> None:
    actions = cache_subparsers(sub)
    p = actions.add_parser("stats", help="entries, disk use, size limit and hit counts",
                           description="Print the number of entries, disk use, size limit and lookup counts of a store.")
    add_store_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_stats)
    p = actions.add_parser("verify", help="check every entry and delete bad ones",
                           description="Decode and check every entry of a store (format, digest, key); delete "
                                       "corrupted, truncated or foreign entries and stray value files. Exit status 0; "
                                       "the counts say what was removed.")
    add_store_argument(p)
    p.add_argument("--no-fix-files", action="store_true",
                   help="do not remove stray value files (use while other processes write to the store)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_verify)
    p = actions.add_parser("clear", help="delete every entry",
                           description="Delete every entry of a store. Asks for confirmation unless --yes is given.")
    add_store_argument(p)
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_clear)


def open_existing_store(directory: str | None) -> Any:
    """Open the store at ``directory`` (default folder if None) without creating one.

    Raises:
        FileNotFoundError: there is no store there.
    """
    from ..store import ContextStore, default_store_dir

    path = Path(directory).expanduser() if directory else default_store_dir()
    if not (path / "store.json").is_file():
        raise FileNotFoundError(f"no compressor-plugin store at {path} (no store.json)")
    return ContextStore(path, size_limit=None)


def _print(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
        return
    width = max(len(k) for k in data)
    for key, val in data.items():
        print(f"{key:>{width}}: {val}")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _store_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report a store that cannot be opened or written (full, read-only, locked) as exit status 2."""

    def run(args: argparse.Namespace) -> int:
        from ..store import StoreError

        try:
            return fn(args)
        except StoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    run.__name__ = fn.__name__
    return run


@_store_errors
def _stats(args: argparse.Namespace) -> int:
    with open_existing_store(args.store) as store:
        data = store.stats()
    if not args.json:
        data = dict(data, bytes=f"{data['bytes']} ({_human(data['bytes'])})",
                    size_limit=f"{data['size_limit']} ({_human(data['size_limit'])})",
                    text_size_limit=f"{data['text_size_limit']} ({_human(data['text_size_limit'])})")
        for key in ("hits", "misses", "removed"):  # lookups by this command itself: always 0
            data.pop(key)
    _print(data, args.json)
    return 0


@_store_errors
def _verify(args: argparse.Namespace) -> int:
    with open_existing_store(args.store) as store:
        data: dict[str, Any] = {"directory": str(store.directory), **store.verify(fix_files=not args.no_fix_files)}
        notes = []
        if store.read_only:
            notes.append("the store is read-only here: bad entries were counted, nothing was removed")
        if data["errors"]:
            notes.append(f"{data['errors']} repairs could not be written (the disk may be full or read-only); "
                         "the entries that were found good are served as before. Free some space and run "
                         "`cache verify` again")
        if notes:
            data["note"] = "; ".join(notes)
    _print(data, args.json)
    return 0


@_store_errors
def _clear(args: argparse.Namespace) -> int:
    with open_existing_store(args.store) as store:
        if not args.yes:
            if not sys.stdin.isatty():
                raise ValueError(f"refusing to clear {store.directory} without --yes (stdin is not a terminal)")
            answer = input(f"Delete every entry of {store.directory}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted")
                return 1
        removed = store.clear()
    _print({"directory": str(store.directory), "removed": removed}, args.json)
    return 0
