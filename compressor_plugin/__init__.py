"""compressor-plugin: learned prompt compression (500xCompressor) for RAG.

Compress text chunks once into the K/V of k compressed tokens, keep them in an on-disk store,
and answer from them with the unchanged base model, from plain Python, LangChain or LlamaIndex.

Main entry points:

* :class:`CompressionEngine` -- compressor + store + generator (``CompressionEngine.from_pretrained()``)
* :class:`Compressor` -- text -> :class:`CompressedContext`
* :class:`Generator` -- prompts mixing text and compressed contexts -> answers
* :class:`ContextStore` -- the on-disk store
* :func:`load_base_model` -- the default model (SmolLM2-135M-Instruct) or any rotary HF causal LM

Every error derives from :class:`CompressorPluginError` and every warning from
:class:`CompressorPluginWarning` (all in :mod:`compressor_plugin.errors`, exported here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CompressionEngine": "compressor_plugin.engine",
    "EngineResult": "compressor_plugin.engine",
    "EngineStream": "compressor_plugin.engine",
    "AsyncEngineStream": "compressor_plugin.engine",
    "Compressor": "compressor_plugin.compressor",
    "CompressorConfig": "compressor_plugin.compressor",
    "CompressedContext": "compressor_plugin.context",
    "Generator": "compressor_plugin.generation",
    "GenerationConfig": "compressor_plugin.generation",
    "GenerationResult": "compressor_plugin.generation",
    "GenerationStream": "compressor_plugin.generation",
    "TokenIds": "compressor_plugin.generation",
    "ContextStore": "compressor_plugin.store",
    "load_base_model": "compressor_plugin.models",
    "MarkerSigner": "compressor_plugin.markers",
}
_ERRORS = (
    "BrokenMarkerWarning", "CheckpointMismatchError", "CheckpointNotFoundError", "CompressorError", "CompressorPluginError",
    "CompressorPluginWarning", "ContextFormatError", "ContextMismatchError", "ContextTooLongError", "DataError",
    "EmptyDocumentWarning", "InvalidOptionError", "InvalidTextError", "MissingChunkError", "MissingChunkWarning",
    "ModelNotAvailableError", "PromptError", "PromptTooLongError", "StoreError", "StoreFormatError",
    "StoreReadOnlyError", "StoreWriteError", "TrainingStateError", "UnauthorizedMarkerWarning", "UnknownOptionError",
    "UnsupportedModelError", "ValueTooLargeError",
)
_EXPORTS.update({name: "compressor_plugin.errors" for name in _ERRORS})

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .compressor import Compressor, CompressorConfig
    from .context import CompressedContext
    from .engine import AsyncEngineStream, CompressionEngine, EngineResult, EngineStream
    from .generation import GenerationConfig, GenerationResult, GenerationStream, Generator, TokenIds
    from .errors import (
        BrokenMarkerWarning,
        CheckpointMismatchError,
        CheckpointNotFoundError,
        CompressorError,
        CompressorPluginError,
        CompressorPluginWarning,
        ContextFormatError,
        ContextMismatchError,
        ContextTooLongError,
        DataError,
        EmptyDocumentWarning,
        InvalidOptionError,
        InvalidTextError,
        MissingChunkError,
        MissingChunkWarning,
        ModelNotAvailableError,
        PromptError,
        PromptTooLongError,
        StoreError,
        StoreFormatError,
        StoreReadOnlyError,
        StoreWriteError,
        TrainingStateError,
        UnauthorizedMarkerWarning,
        UnknownOptionError,
        UnsupportedModelError,
        ValueTooLargeError,
    )
    from .markers import MarkerSigner
    from .models import load_base_model
    from .store import ContextStore


def __getattr__(name: str) -> Any:
    """Import on first use, so ``import compressor_plugin`` and ``--help`` stay fast."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'compressor_plugin' has no attribute {name!r}")
