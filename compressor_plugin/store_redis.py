"""A Redis tier shared by many processes and machines, behind each one's local store folder.

``ContextStore(path, remote="redis://host:6379/0")`` (or ``remote=RedisTier(...)``) puts a
Redis server behind the local folder:

* a local miss is looked up in Redis; the value is verified exactly like a local one
  (:func:`~compressor_plugin.store.decode_context` / :func:`~compressor_plugin.store.decode_text`:
  digests, key binding, range checks) and, if good, written into the local folder; a bad
  remote value is a miss (and is not copied);
* writes (:meth:`ContextStore.put` / :meth:`~ContextStore.put_many`, so also
  ``get_or_compress`` and ``cache build``) go to the folder and to Redis;
* the same keys and the same bytes as the folder (``<prefix>ctx:<key>``, ``<prefix>text:<key>``),
  bytes only: nothing is pickled or unpickled on either side;
* an unreachable, killed or slow server means misses and recompute, never an exception into
  the caller: every command has a short connect/socket timeout, the first failure is logged
  once as a warning, and the tier is skipped for ``retry_after`` seconds before it is tried again.

Install with ``pip install "compressor-plugin[redis]"``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit

from .store_backend import DEFAULT_MAX_VALUE_SIZE

logger = logging.getLogger("compressor_plugin.store")

#: Prefix of every Redis key written by the tier (the store's format version is part of it).
DEFAULT_PREFIX = "compressor_plugin:v1:"


class RedisTier:
    """A shared remote tier on a Redis server: ``name -> bytes``, failures are misses.

    Args:
        url: ``redis://[:password@]host:port/db``, ``rediss://...`` (TLS) or
            ``unix:///path/to/socket?db=0``.
        prefix: prepended to every key, so one server can hold several stores.
        ttl: optional lifetime of written entries in seconds (Redis ``EX``); otherwise the
            server's own ``maxmemory-policy`` decides what is evicted.
        socket_timeout: seconds a command may take before the server counts as unreachable.
        connect_timeout: seconds to wait for a connection.
        retry_after: after a failure, seconds during which the tier is skipped (reads are
            misses, writes are dropped) before the server is tried again.
        max_value_size: the largest value read back; longer values are refused unread
            (only ``max_value_size + 1`` bytes are transferred).
        client: an existing ``redis.Redis`` client to use instead of ``url`` (tests, custom
            connection pools); it must return bytes (``decode_responses=False``).

    Raises:
        ImportError: the ``redis`` package is not installed (``pip install "compressor-plugin[redis]"``).
    """

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX, ttl: float | None = None,
                 socket_timeout: float = 0.5, connect_timeout: float = 0.5, retry_after: float = 5.0,
                 max_value_size: int = DEFAULT_MAX_VALUE_SIZE, client: Any = None):
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError('the Redis tier needs the redis package: pip install "compressor-plugin[redis]"') from exc
        if ttl is not None and float(ttl) <= 0:
            raise ValueError("ttl must be a positive number of seconds, or None")
        self.url = url
        self._settings = {"prefix": prefix, "ttl": ttl, "socket_timeout": socket_timeout,
                          "connect_timeout": connect_timeout, "retry_after": retry_after,
                          "max_value_size": max_value_size, "has_client": client is not None}
        self.prefix = prefix
        self.ttl = ttl
        self.retry_after = float(retry_after)
        self.max_value_size = int(max_value_size)
        self._errors = (redis.ConnectionError, redis.TimeoutError, OSError)
        self._response_error = redis.ResponseError
        self._client = client if client is not None else redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0, decode_responses=False)
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._warned = False

    # ------------------------------------------------------------------ failure handling
    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self.retry_after
            warn, self._warned = not self._warned, True
        if warn:
            logger.warning("remote store tier %s is unreachable (%s during %s: %s); using the local store only "
                           "and recomputing misses, retrying every %.0f s", self, type(exc).__name__, what, exc,
                           self.retry_after)
        else:
            logger.debug("remote store tier %s: %s failed: %s", self, what, exc)

    def _succeeded(self) -> None:
        if self._warned:
            with self._lock:
                was, self._warned = self._warned, False
            if was:
                logger.info("remote store tier %s is reachable again", self)

    # ------------------------------------------------------------------ operations
    def get(self, name: str) -> bytes | None:
        """The bytes under ``name``, or None (absent, too large, wrong type, or the server is unreachable)."""
        if not self._available():
            return None
        try:
            data = self._client.getrange(self.prefix + name, 0, self.max_value_size)
        except self._response_error as exc:  # e.g. WRONGTYPE: a planted non-string value
            logger.warning("ignoring remote entry %s in %s: %s", name, self, exc)
            return None
        except self._errors as exc:
            self._failed("a read", exc)
            return None
        self._succeeded()
        if not data:
            return None
        if len(data) > self.max_value_size:
            logger.warning("ignoring remote entry %s in %s: larger than %d bytes", name, self, self.max_value_size)
            return None
        return bytes(data)

    def set_many(self, items: Iterable[tuple[str, bytes]]) -> bool:
        """Write every ``(name, bytes)``; True if the server took them (failures are logged, not raised)."""
        items = list(items)
        if not items or not self._available():
            return False
        try:
            pipe = self._client.pipeline(transaction=False)
            for name, data in items:
                if type(data) is not bytes:
                    raise TypeError(f"the remote tier keeps bytes only, not {type(data).__name__}")
                pipe.set(self.prefix + name, data, px=max(1, int(self.ttl * 1000)) if self.ttl else None)
            pipe.execute()
        except self._errors as exc:
            self._failed("a write", exc)
            return False
        except self._response_error as exc:  # e.g. OOM with maxmemory-policy noeviction
            logger.warning("remote store tier %s refused a write: %s", self, exc)
            return False
        self._succeeded()
        return True

    def delete(self, *names: str) -> int:
        """Remove ``names``; returns how many were there (0 when the server is unreachable)."""
        if not names or not self._available():
            return 0
        try:
            removed = int(self._client.delete(*(self.prefix + n for n in names)))
        except (*self._errors, self._response_error) as exc:
            self._failed("a delete", exc)
            return 0
        self._succeeded()
        return removed

    def ping(self) -> bool:
        """True if the server answers now (ignores ``retry_after``)."""
        try:
            ok = bool(self._client.ping())
        except (*self._errors, self._response_error):
            return False
        self._down_until = 0.0
        return ok

    def close(self) -> None:
        """Close the client's connections."""
        try:
            self._client.close()
        except self._errors:  # pragma: no cover
            pass

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickles as its settings (for worker processes); the receiver connects on its own.
        settings = dict(self._settings)
        if settings.pop("has_client"):
            raise TypeError("a RedisTier built around an existing client cannot be pickled; pass a URL")
        return (_rebuild, (self.url, settings))

    def __repr__(self) -> str:
        parts = urlsplit(self.url)
        netloc = parts.netloc
        if "@" in netloc:  # never print a password
            netloc = "***@" + netloc.rsplit("@", 1)[1]
        return f"RedisTier({urlunsplit(parts._replace(netloc=netloc))!r})"

    __str__ = __repr__


def _rebuild(url: str, settings: dict[str, Any]) -> RedisTier:
    return RedisTier(url, **settings)
