"""A LangChain ``ByteStore`` backed by a :class:`~compressor_plugin.store.ContextStore` folder.

Use it wherever LangChain takes a ``ByteStore`` (``CacheBackedEmbeddings``,
``MultiVectorRetriever`` docstores through ``create_kv_docstore``, ...) to keep those bytes in
the same on-disk, multi-process, size-limited store as the compressed chunks::

    from compressor_plugin.integrations.langchain_store import ContextByteStore

    byte_store = ContextByteStore("/data/chunks")        # or ContextByteStore(context_store)
    byte_store.mset([("a", b"1")])
    byte_store.mget(["a", "b"])                           # [b"1", None]

Values are bytes and stay bytes: nothing is pickled on write or unpickled on read. Entries
live in their own namespace, apart from compressed contexts, and share the store's size
limit and least-recently-used eviction (an evicted key reads as ``None``). A value larger
than the store's size limit is refused with ``ValueTooLargeError`` rather than evicting the
store's contexts to make room.
"""

from __future__ import annotations

import asyncio
import os
from typing import AsyncIterator, Iterator, Sequence

from langchain_core.stores import BaseStore

from ..store import ContextStore

__all__ = ["ContextByteStore"]


class ContextByteStore(BaseStore[str, bytes]):
    """LangChain ``BaseStore[str, bytes]`` view of a :class:`ContextStore`.

    Args:
        store: an open :class:`ContextStore`, a store folder, or None for the default
            folder (``cache_home()/"store"``).
        **store_kwargs: passed to :class:`ContextStore` when ``store`` is not one already.
    """

    def __init__(self, store: ContextStore | str | os.PathLike | None = None, **store_kwargs: object):
        if isinstance(store, ContextStore):
            if store_kwargs:
                raise TypeError("store options apply only when a folder is given, not an open ContextStore")
            self.store = store
        else:
            self.store = ContextStore(store, **store_kwargs)  # type: ignore[arg-type]

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values of ``keys`` (None where missing)."""
        return [self.store.get_bytes(k) for k in keys]

    def mset(self, key_value_pairs: Sequence[tuple[str, bytes]]) -> None:
        """Store each ``(key, bytes)`` pair.

        Raises:
            TypeError: a value is not bytes.
            ValueTooLargeError: a value is larger than the store takes (its size limit).
            StoreReadOnlyError: the store is read-only.
        """
        for key, value in key_value_pairs:
            self.store.put_bytes(key, value)

    def mdelete(self, keys: Sequence[str]) -> None:
        """Remove ``keys``; missing keys are ignored."""
        for key in keys:
            self.store.delete_bytes(key)

    def yield_keys(self, *, prefix: str | None = None) -> Iterator[str]:
        """Keys of this namespace, in sorted order, optionally only those starting with ``prefix``."""
        yield from self.store.byte_keys(prefix)

    async def amget(self, keys: Sequence[str]) -> list[bytes | None]:
        return await asyncio.to_thread(self.mget, keys)

    async def amset(self, key_value_pairs: Sequence[tuple[str, bytes]]) -> None:
        await asyncio.to_thread(self.mset, key_value_pairs)

    async def amdelete(self, keys: Sequence[str]) -> None:
        await asyncio.to_thread(self.mdelete, keys)

    async def ayield_keys(self, *, prefix: str | None = None) -> AsyncIterator[str]:
        # SQLite connections belong to one thread, so the keys are listed in a single worker
        # call instead of advancing one iterator from several executor threads.
        keys = await asyncio.to_thread(lambda: list(self.store.byte_keys(prefix)))
        for key in keys:
            yield key

    def __repr__(self) -> str:
        return f"ContextByteStore({str(self.store.directory)!r})"
