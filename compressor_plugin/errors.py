"""Every exception and warning compressor-plugin raises, with one base class each.

Catch :class:`CompressorPluginError` to handle any error of this package; each subclass also
derives from the built-in type it replaced (``ValueError``, ``KeyError``, ``TypeError``,
``RuntimeError``), so existing ``except ValueError:`` code keeps working. Errors carry the
thing at fault as structured fields, when known:

* ``key`` -- a store key (64 hex characters);
* ``document_id`` -- the id of the document or node being processed;
* ``path`` -- the file or folder at fault;
* ``option`` -- the name of the option at fault.

Warnings derive from :class:`CompressorPluginWarning` (a ``UserWarning``), so one filter
silences or escalates all of them::

    warnings.simplefilter("error", compressor_plugin.CompressorPluginWarning)
"""

from __future__ import annotations

import os
from typing import Any, Sequence

__all__ = [
    "BrokenMarkerWarning",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CompressorError",
    "CompressorPluginError",
    "CompressorPluginWarning",
    "ContextFormatError",
    "ContextMismatchError",
    "ContextTooLongError",
    "DataError",
    "EmptyDocumentWarning",
    "InvalidOptionError",
    "InvalidTextError",
    "MissingChunkError",
    "MissingChunkWarning",
    "ModelNotAvailableError",
    "PromptError",
    "PromptTooLongError",
    "StoreError",
    "StoreFormatError",
    "StoreReadOnlyError",
    "StoreWriteError",
    "TrainingStateError",
    "UnauthorizedMarkerWarning",
    "UnknownOptionError",
    "UnsupportedModelError",
    "ValueTooLargeError",
]


class CompressorPluginError(Exception):
    """Base class of every error raised by compressor-plugin.

    Args:
        message: what went wrong and, where possible, what to do about it.
        key: the store key at fault, if any.
        document_id: the document or node at fault, if any.
        path: the file or folder at fault, if any.
        option: the option at fault, if any.
    """

    def __init__(self, message: str = "", *, key: str | None = None, document_id: str | None = None,
                 path: str | os.PathLike | None = None, option: str | None = None):
        super().__init__(message)
        self.message = message
        self.key = key
        self.document_id = document_id
        self.path = None if path is None else os.fspath(path)
        self.option = option

    def __str__(self) -> str:  # KeyError would quote the message; show it as written
        return self.message

    def _fields(self) -> dict[str, Any]:
        return {"key": self.key, "document_id": self.document_id, "path": self.path, "option": self.option}

    def __reduce__(self) -> Any:  # keep the fields across pickling (worker processes)
        return (_rebuild, (type(self), self.message, self.__dict__.copy()))


def _rebuild(cls: type, message: str, state: dict[str, Any]) -> CompressorPluginError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class CompressorPluginWarning(UserWarning):
    """Base class of every warning issued by compressor-plugin."""


# ---------------------------------------------------------------------------------- inputs and options
class UnknownOptionError(CompressorPluginError, TypeError):
    """An option that does not exist was passed (``option`` names it)."""


class InvalidOptionError(CompressorPluginError, ValueError):
    """An option has a value it cannot take (``option`` names it)."""


class CompressorError(CompressorPluginError, ValueError):
    """Invalid input to a compressor."""


class ContextTooLongError(CompressorError):
    """A text is longer than the compressor's maximum input length.

    ``tokens`` is the text's length and ``limit`` the compressor's maximum, when known.
    """

    def __init__(self, message: str = "", *, tokens: int | None = None, limit: int | None = None,
                 **fields: Any):
        super().__init__(message, **fields)
        self.tokens = tokens
        self.limit = limit


class PromptError(CompressorPluginError, ValueError):
    """A prompt that cannot be generated from."""


class ContextMismatchError(PromptError):
    """A compressed context made for another base model."""


class PromptTooLongError(PromptError):
    """A prompt that takes more positions than the model has (``config.max_position_embeddings``)."""


class InvalidTextError(PromptError):
    """Prompt text that is not valid Unicode (a lone surrogate), which no tokenizer can encode."""


class DataError(CompressorPluginError, ValueError):
    """An evaluation data file that is missing fields or malformed (``path`` names it)."""


# ---------------------------------------------------------------------------------- models and checkpoints
class ModelNotAvailableError(CompressorPluginError, RuntimeError):
    """The requested base model cannot be found or loaded."""


class UnsupportedModelError(CompressorPluginError, ValueError):
    """The model is not a causal LM with rotary position embeddings."""


class CheckpointNotFoundError(CompressorPluginError, FileNotFoundError):
    """No compressor checkpoint at the given path, and no shipped checkpoint of that name."""


class CheckpointMismatchError(CompressorPluginError, ValueError):
    """A checkpoint was made for a different base model, or is not a checkpoint (``path``)."""


class TrainingStateError(CompressorPluginError, ValueError):
    """A training run's ``state.pt`` that cannot be resumed from: damaged, or not of this run (``path``)."""


# ---------------------------------------------------------------------------------- store and contexts
class ContextFormatError(CompressorPluginError, ValueError):
    """Bytes that are not a valid, intact serialised CompressedContext."""


class StoreError(CompressorPluginError):
    """Base class of the store's own errors."""


class StoreFormatError(StoreError, ValueError):
    """The folder is not a store this version can open, or its database is damaged (``path``)."""


class StoreReadOnlyError(StoreError, PermissionError):
    """A write to a store opened read-only (or found on a read-only volume)."""


class StoreWriteError(StoreError, OSError):
    """A write failed (disk full, I/O error, permissions); nothing of the failed batch was kept."""


class ValueTooLargeError(StoreError, ValueError):
    """A value larger than the store accepts (its size limit, or the largest single value)."""


class MissingChunkError(CompressorPluginError, KeyError):
    """A chunk this pipeline compressed is gone from the store, K/V and text both (``key``)."""


# ---------------------------------------------------------------------------------- warnings
class MissingChunkWarning(CompressorPluginWarning):
    """A marker's compressed entry was missing; its text was used instead."""


class UnauthorizedMarkerWarning(CompressorPluginWarning):
    """A prompt holds a marker this engine did not issue; it was passed to the model as plain text."""


class BrokenMarkerWarning(CompressorPluginWarning):
    """A prompt holds the start of a marker that is not a whole marker (it was cut or edited)."""


class EmptyDocumentWarning(CompressorPluginWarning):
    """Documents with no text were passed through uncompressed.

    Attributes:
        positions: their positions in the call's input.
        document_ids: their ids, in the same order (None for a document without one).

    The message says how many, not which: document ids are untrusted input, and a message that
    held them would add an entry to Python's warning registry for every new id, for the life of
    the process. The positions and ids are here and in the DEBUG log.
    """

    def __init__(self, message: str, positions: Sequence[int] = (), document_ids: Sequence[str | None] = ()):
        super().__init__(message)
        self.positions = list(positions)
        self.document_ids = list(document_ids)
