"""``compressor-plugin cache build``: compress a whole corpus into a store, offline.

Reads a JSONL file, a ``.txt``/``.md`` file or a folder of them, splits the documents into
token-bounded chunks, compresses every chunk the store does not hold yet, and optionally writes
a chunk map (JSONL: document id, chunk index, character span, token count, store key). Run it
again after an interruption: it resumes without recomputing anything already stored. With
``--ray`` the compression runs on a Ray Data actor pool (see ``docs/offline-caching.md``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..anchors import DEFAULT_ANCHORS
from .cache import add_store_argument, cache_subparsers

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``"1073741824"``, ``"64G"``, ``"64GiB"``, ``"512M"`` (binary units)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 68719476736, 64GiB, 512M)")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = cache_subparsers(sub).add_parser(
        "build", help="compress a corpus (JSONL, .txt/.md files or a folder) into a store, resumably",
        description="Split documents into chunks of at most --chunk-tokens tokens (on token boundaries, preferring "
                    "paragraph and sentence ends), compress every chunk the store does not hold yet, and write a "
                    "chunk map. Interrupted and run again, it resumes without recomputing what is stored. "
                    "Bad inputs (unreadable files, non-UTF-8 bytes, bad JSON lines, empty documents) are "
                    "skipped and counted.")
    p.add_argument("--input", required=True, metavar="PATH",
                   help="JSONL file (one document per line), .txt/.md file, or a folder of them (recursive)")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="in an --input folder, also read symlinked files whose target lies outside the folder "
                        "(default: skip them, counted as outside_input; links within the folder are read)")
    add_store_argument(p)
    p.add_argument("--text-field", default=None, metavar="NAME",
                   help="JSONL field with the document text (default: 'text', else 'context')")
    p.add_argument("--id-field", default="id", metavar="NAME",
                   help="JSONL field with the document id (default: id; lines without one get FILE:LINE)")
    p.add_argument("--chunk-tokens", type=_positive, default=512, metavar="N",
                   help="most tokens per chunk, at most the compressor's max_length (default: 512)")
    p.add_argument("--overlap", type=_non_negative, default=0, metavar="M",
                   help="tokens shared by consecutive chunks of a document (default: 0)")
    p.add_argument("--batch-size", type=_positive, default=None, metavar="B",
                   help="chunks per encoder forward (default: 32 on CPU, 256 on GPU)")
    p.add_argument("--checkpoint", default="default",
                   help="compressor checkpoint folder or shipped name (default: kv-k16)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--anchors", type=_non_negative, default=DEFAULT_ANCHORS, metavar="N",
                   help="anchor token budget per chunk: salient exact spans (names, numbers, dates) kept as text "
                        "beside the K/V; counted as prompt tokens and part of every key (default: %(default)s; 0 = the K/V alone)")
    p.add_argument("--anchor-workers", type=_non_negative, default=None, metavar="N",
                   help="processes that choose anchors beside the encoder (default: 8 on a GPU host with 10 or "
                        "more cores, where they made the build 1.7x faster, else 0: the main process; not used "
                        "with --ray)")
    p.add_argument("--map", default=None, metavar="OUT.jsonl",
                   help="write the chunk map here (appended to and deduplicated when it exists); a chunk kept as "
                        "text has \"key\": null and its \"text\" there")
    p.add_argument("--compress-short", action="store_true",
                   help="compress every chunk; by default a chunk not longer than k + anchors + 8 tokens is kept "
                        "as text (as the engine's mark does): compressed, it would not shorten the prompt")
    p.add_argument("--limit", type=_positive, default=None, metavar="N", help="read at most N documents")
    p.add_argument("--remote", default=None, metavar="URL",
                   help="also write every context to a shared remote tier, e.g. redis://host:6379/0 (pip install "
                        "'compressor-plugin[redis]'); what is already stored is judged by the local --store")
    p.add_argument("--size-limit", type=parse_size, default=None, metavar="BYTES",
                   help="store size limit, e.g. 64GiB (default: keep the store's; 4 GiB for a new store). "
                        "Entries beyond it are evicted, so size it for the corpus")
    p.add_argument("--writer-threads", type=_positive, default=None, metavar="N",
                   help="threads that serialise and store contexts (default: 1 on CPU, 4 on GPU)")
    p.add_argument("--no-merge-lora", action="store_true",
                   help="run the LoRA adapter as separate matrices instead of folding it into the weights "
                        "for the build (slower; outputs differ only by rounding)")
    p.add_argument("--compile", action="store_true",
                   help="compile the transformer blocks with torch.compile (GPU: faster after a warm-up "
                        "of about a minute)")
    p.add_argument("--fused-kernels", action="store_true",
                   help="CUDA: Liger's fused Triton RMSNorm, rotary and SwiGLU kernels in the encoder (pip install "
                        "'compressor-plugin[fast]'); they replace this process's kernels for the model's family, "
                        "so use them in a build process, not beside an engine. Not used with --ray")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    ray = p.add_argument_group("Ray", "compress on a Ray Data actor pool instead of in this process")
    ray.add_argument("--ray", action="store_true", help="use Ray (pip install 'ray[data]')")
    ray.add_argument("--ray-address", default="local", metavar="ADDR",
                     help="'local' starts Ray on this machine (default), 'auto' joins the running cluster, "
                          "or a ray:// address")
    ray.add_argument("--num-workers", type=_positive, default=2, metavar="N",
                     help="actors, one model each (default: 2)")
    ray.add_argument("--num-gpus-per-worker", type=float, default=0, metavar="G",
                     help="GPUs per actor: 0 (CPU workers, default) or 1")
    ray.add_argument("--num-cpus-per-worker", type=float, default=1, metavar="C", help="CPUs per actor (default: 1)")
    ray.add_argument("--shard-dir", default=None, metavar="DIR",
                     help="local folder for the actors' store shards (default: under the system temp folder)")
    p.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    from ..store import default_store_dir

    if not Path(args.input).expanduser().exists():
        raise FileNotFoundError(f"input not found: {args.input}")
    store = args.store or str(default_store_dir())
    progress = not args.no_progress
    if args.ray and args.fused_kernels:
        raise ValueError("--fused-kernels runs in this process's encoder; it is not used with --ray")
    if args.ray:
        from ..caching.ray_build import build_cache_ray

        summary = build_cache_ray(
            args.input, _open(store, args.size_limit, args.remote), args.checkpoint, text_field=args.text_field,
            id_field=args.id_field, chunk_tokens=args.chunk_tokens, overlap=args.overlap, batch_size=args.batch_size,
            device=args.device, dtype=args.dtype, map_path=args.map, limit=args.limit, address=args.ray_address,
            num_workers=args.num_workers, num_gpus_per_worker=args.num_gpus_per_worker,
            num_cpus_per_worker=args.num_cpus_per_worker, shard_dir=args.shard_dir, progress=progress,
            merge_lora=not args.no_merge_lora, compile=args.compile, anchors=args.anchors,
            follow_symlinks=args.follow_symlinks, keep_short=not args.compress_short)
    else:
        from ..caching.build import build_cache, default_anchor_workers
        from ..compressor import Compressor

        compressor = Compressor.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype)
        workers = args.anchor_workers
        if workers is None:
            workers = default_anchor_workers(compressor.device) if args.anchors else 0
        summary = build_cache(
            args.input, _open(store, args.size_limit, args.remote), compressor, text_field=args.text_field,
            id_field=args.id_field,
            chunk_tokens=args.chunk_tokens, overlap=args.overlap, batch_size=args.batch_size, map_path=args.map,
            limit=args.limit, writer_threads=args.writer_threads, progress=progress,
            merge_lora=not args.no_merge_lora, compile=args.compile, anchors=args.anchors,
            follow_symlinks=args.follow_symlinks,
            anchor_workers=workers, keep_short=not args.compress_short,
            fused_kernels=args.fused_kernels)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(summary.format())
    if summary.interrupted:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def _open(directory: str, size_limit: int | None, remote: str | None = None):  # noqa: ANN202 - ContextStore, lazily
    from ..store import ContextStore

    return ContextStore(directory, size_limit=size_limit, remote=remote)
