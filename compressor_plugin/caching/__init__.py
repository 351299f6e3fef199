"""Offline corpus caching: split a corpus into chunks and compress them all into a store.

* :func:`build_cache` (one process; CPU or GPU) and :func:`build_cache_ray` (Ray Data,
  one model per actor, store shards merged at the end) fill a
  :class:`~compressor_plugin.store.ContextStore` and write a chunk map that joins every
  chunk back to its document (see ``docs/offline-caching.md``);
* :class:`TokenChunker` splits documents on token boundaries of the compressor's tokenizer;
* :func:`benchmark` measures the compression throughput (chunks/s, TFLOP/s).

The command line is ``compressor-plugin cache build``.
"""

from __future__ import annotations

from .build import (
    BuildSummary,
    ChunkMapWriter,
    benchmark,
    build_cache,
    encode_contexts,
    encoder_flops,
    read_chunk_map,
)
from .chunking import Chunk, Document, TokenChunker, iter_documents
from .ray_build import build_cache_ray

__all__ = [
    "BuildSummary",
    "Chunk",
    "ChunkMapWriter",
    "Document",
    "TokenChunker",
    "benchmark",
    "build_cache",
    "build_cache_ray",
    "encode_contexts",
    "encoder_flops",
    "iter_documents",
    "read_chunk_map",
]
