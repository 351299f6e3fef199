"""The fast answer path: preallocated (static) K/V caches, a captured prefill and a one-token decode step.

After the prompt has been laid into a cache, decoding appends one token per step. With a
growing cache every step re-allocates and copies each layer's keys and values; with a static
cache each layer's K/V lives in one buffer of fixed length, the prompt is written into its
first slots once, and every decode step writes one slot in place.

Fixed shapes are what CUDA graphs need: on a GPU the forward (one token per row when
decoding; the prompt's text inputs, left-padded to a bucket of :data:`PREFILL_BUCKETS`, when
prefilling) is compiled with ``torch.compile(mode="reduce-overhead")``, which captures its
kernels once per shape and replays them, removing the per-operator Python and kernel-launch
overhead. A short prompt's prefill is bound by that overhead, not by arithmetic, so it is
captured too (:class:`ForwardStep`); longer ones run eagerly.

Shape buckets: a cache holds ``bucket_length(prompt + new tokens)`` slots, the needed length
rounded up to 256, 512, 768 or 1,024, or beyond that to a power of two (2,048, 4,096, ...), so
prompts of different lengths share a compiled forward. Caches are kept in a small pool and
reused: the compiled forward sees the same buffers again, so no recompilation or re-capture
happens between requests of the same bucket.

Static prefill (``Generator`` decides when; see docs/architecture.md): the stored contexts'
rotated keys and values are written into slots ``[0, C)`` of a pooled cache (:func:`fill_static`),
then one forward runs over the text inputs left-padded to ``prefill_bucket(T)`` inputs, which
fill slots ``[C, C + bucket)``. Its mask is ``(batch, 1, bucket, slots)``: a padding input sees
only itself and nobody sees it, every slot past the prompt is hidden, and the compiled graph
depends on (batch, bucket, slots) only, not on C or on the prompt. Decoding then continues in
the same cache.

The attention mask of a decode step is a ``(batch, 1, 1, slots)`` tensor that marks the slots a
row may see: its own prompt slots (batched prompts are padded) and the decode slots written so
far. Slots not written yet are masked, so stale values in a reused buffer are never read.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any, Sequence

import torch

from .hf_compat import cache_kwargs

BUCKET = 256
"""Static caches hold a multiple of this many slots."""

COMPILE_MAX_BATCH = 8
"""Largest batch whose forwards are compiled by default. CUDA graphs remove per-operator launch
overhead, which matters when a forward has little work; a large batch shares that overhead
among its rows, and each new batch size would cost another compilation."""

PREFILL_BUCKETS = (32, 64, 128, 256, 512)
"""Lengths the text inputs of a prefill straight into a static cache are left-padded to. A
prompt with more text inputs than the last bucket is prefilled eagerly: its prefill is bound by
arithmetic, not by launch overhead, and each length would need its own capture."""


def bucket_length(needed: int, bucket: int = BUCKET) -> int:
    """The cache length for ``needed`` slots: a multiple of ``bucket`` up to ``4 * bucket``, then
    the next power of two times ``bucket``.

    Short prompts (the common case, and where padding costs most) get tight buckets; long ones
    share a few, so a compiled step is compiled at most about ``4 + log2(max / (4 * bucket))``
    times per batch size (7 up to 8,192 positions with buckets of 256).
    """
    n = max(1, -(-int(needed) // bucket))
    if n > 4:
        n = 1 << (n - 1).bit_length()
    return n * bucket


def prefill_bucket(inputs: int) -> int | None:
    """The padded input length of a static prefill of ``inputs`` inputs, or None past the last bucket."""
    return next((b for b in PREFILL_BUCKETS if b >= inputs), None)


def new_static_cache(config: Any, slots: int) -> Any:
    """A transformers ``StaticCache`` of ``slots`` positions, or None if the model's layers are not all full attention.

    Sliding-window and other special layers keep their K/V differently; those models use the
    growing cache instead.
    """
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    cache = StaticCache(config=config, max_cache_len=int(slots))
    if not all(type(layer) is StaticLayer for layer in cache.layers):
        return None
    return cache


def fill_static(cache: Any, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], slots: int) -> None:
    """Write ``kv``, one ``(keys, values)`` pair of ``(batch, heads, >= slots, head_dim)`` per
    layer, into the first ``slots`` positions of every layer of ``cache``.

    The static cache's write position becomes ``slots``: the next forward writes after them.
    Its buffers are allocated here (eagerly, never inside a compiled forward) if they are not
    yet; ``slots`` may be 0 then.
    """
    for layer, (k, v) in zip(cache.layers, kv):
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        if slots:
            layer.keys[:, :, :slots].copy_(k[:, :, :slots])
            layer.values[:, :, :slots].copy_(v[:, :, :slots])
        layer.cumulative_length.fill_(slots)


class StaticCachePool:
    """Static caches kept for reuse, keyed by (batch, slots, dtype, device).

    A cache is checked out for one generation and given back afterwards; two generations that
    run at the same time (streams consumed in turns) never share one. At most ``max_idle``
    caches are kept, and only those of at most ``max_batch`` rows: reuse matters for the
    compiled step (same buffers, no new capture), while a large batch's cache would hold much
    memory for little gain.
    """

    def __init__(self, config: Any, max_idle: int = 4, max_batch: int = COMPILE_MAX_BATCH):
        self.config = config
        self.max_idle = int(max_idle)
        self.max_batch = int(max_batch)
        self._idle: OrderedDict[tuple, list[Any]] = OrderedDict()
        self._lock = threading.Lock()

    def acquire(self, batch: int, slots: int, dtype: torch.dtype, device: torch.device) -> Any:
        """A cache for ``batch`` rows of ``slots`` positions (None if the model needs a growing cache)."""
        key = (int(batch), int(slots), dtype, str(device))
        with self._lock:
            free = self._idle.get(key)
            if free:
                cache = free.pop()
                if not free:
                    del self._idle[key]
                return cache
        cache = new_static_cache(self.config, slots)
        if cache is not None:
            cache._pool_key = key  # type: ignore[attr-defined]
        return cache

    def release(self, cache: Any) -> None:
        """Give a cache back for reuse."""
        key = getattr(cache, "_pool_key", None)
        if key is None or key[0] > self.max_batch:
            return
        with self._lock:
            self._idle.setdefault(key, []).append(cache)
            self._idle.move_to_end(key)
            while sum(len(v) for v in self._idle.values()) > self.max_idle:
                old_key = next(iter(self._idle))
                self._idle[old_key].pop(0)
                if not self._idle[old_key]:
                    del self._idle[old_key]

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


def _forward_last(lm: Any, cache: Any, input_ids: torch.Tensor, position_ids: torch.Tensor,
                  attention_mask: torch.Tensor, cache_kw: str) -> torch.Tensor:
    """One forward over ``input_ids`` ``(batch, T)`` into ``cache``: logits ``(batch, vocab)`` of the last position.

    ``cache_kw`` is the forward's name for the cache argument (``cache`` or ``past_key_values``),
    looked up outside so that the compiled function does not trace the lookup.
    """
    out = lm(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=True,
             logits_to_keep=1, **{cache_kw: cache})
    return out.logits[:, -1, :]


_compiled_forwards: dict[tuple[Any, str | None], Any] = {}
_compile_lock = threading.Lock()


def prepare_graph_tls() -> None:
    """Give the calling thread the thread-local state of torch's CUDA-graph trees.

    Up to torch 2.11, ``torch._inductor.cudagraph_trees`` creates that state only in the thread
    that imports it first, and a CUDA-graph function called from any other plain thread fails
    with an ``AssertionError``. The compiled decode step runs on its own thread, so without this
    the first of the two threads to import the module would leave the other one broken: a
    process that decodes with this package could no longer run, say, transformers'
    ``generate(cache_implementation="static")`` compiled on its main thread. Newer torch
    versions create the state lazily in every thread, and then this does nothing.
    """
    try:
        from torch._inductor import cudagraph_trees as graphs
    except Exception:  # noqa: BLE001 - no inductor: nothing to prepare
        return
    names = ("tree_manager_containers", "tree_manager_locks")
    if all(hasattr(graphs.local, n) or torch._C._is_key_in_tls(n) for n in names):
        return
    init = getattr(graphs, "_initialize_tls", None)
    if init is not None:
        init(graphs.local)
        return
    from collections import defaultdict

    graphs.local.tree_manager_containers = {}
    graphs.local.tree_manager_locks = defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", graphs.local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", graphs.local.tree_manager_locks)


def _compiled(backend: Any = "inductor", mode: str | None = "reduce-overhead") -> Any:
    """The forward compiled with ``backend`` and ``mode`` (one compiled function per process and setting)."""
    prepare_graph_tls()  # the calling thread (usually the main one) keeps working CUDA-graph state
    with _compile_lock:
        fn = _compiled_forwards.get((backend, mode))
        if fn is None:
            import torch._dynamo

            # One graph per input shape (batch x prefill bucket or one decode token) x cache bucket
            # and per pooled cache: allow more than the default 8.
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
            fn = _compiled_forwards[(backend, mode)] = torch.compile(_forward_last, backend=backend, mode=mode,
                                                                     dynamic=False)
        return fn


class _StepThread:
    """One long-lived thread that runs every compiled forward (prefill and decode) of the process.

    CUDA-graph state (graph trees, memory pools) is kept per thread: forwards called from many
    threads (a web server's workers, one worker thread per async stream) would capture the
    graphs again in each thread. Running them all here captures once.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the step thread (under ``torch.no_grad``); its result or exception."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="compressor-plugin-decode", daemon=True)
                self._thread.start()
        done: Future = Future()
        self._jobs.put((fn, args, done))
        return done.result()

    def _loop(self) -> None:
        prepare_graph_tls()
        while True:
            fn, args, done = self._jobs.get()
            try:
                with torch.no_grad():
                    done.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                done.set_exception(exc)


_step_thread = _StepThread()


def _run_compiled(fn: Any, device: torch.device, *args: Any) -> torch.Tensor:
    with torch.cuda.device(device):
        torch.compiler.cudagraph_mark_step_begin()
        # a copy: the graph's output buffer is overwritten by the next step
        return fn(*args).to(torch.float32, copy=True)


class ForwardStep:
    """Runs a forward into a static cache, compiled (CUDA graphs) or eager: a decode step (one
    token per row) or a prefill (the text inputs of a prompt, left-padded to a bucket).

    Args:
        compile: compile the forward with ``torch.compile``.
        backend, mode: the ``torch.compile`` settings (default: inductor with
            ``"reduce-overhead"``, i.e. CUDA graphs).
        devices: device types on which the compiled forward runs (default: CUDA only); on
            others the eager forward runs.
        max_batch: larger batches run the eager forward (see :data:`COMPILE_MAX_BATCH`).

    If the compiled forward fails once (a compiler or capture error), a warning is issued and
    this step runs eagerly from then on; the failed call is rerun eagerly, so no answer changes.
    """

    def __init__(self, compile: bool, *, backend: Any = "inductor", mode: str | None = "reduce-overhead",
                 devices: tuple[str, ...] = ("cuda",), max_batch: int = COMPILE_MAX_BATCH):
        self.compile = bool(compile)
        self.backend, self.mode, self.devices = backend, mode, tuple(devices)
        self.max_batch = int(max_batch)
        self._failed = False

    def active(self, device: torch.device, batch: int = 1) -> bool:
        """Whether the compiled forward runs on ``device`` for ``batch`` rows."""
        return self.compile and not self._failed and device.type in self.devices and batch <= self.max_batch

    def __call__(self, lm: Any, cache: Any, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 attention_mask: torch.Tensor, slot: int) -> torch.Tensor:
        """Logits ``(batch, vocab)`` in float32 of the last of ``input_ids`` ``(batch, T)``, which
        are written at cache slots ``[slot, slot + T)`` (the cache's write position is ``slot``)."""
        kw = next(iter(cache_kwargs(lm, cache)))
        if self.active(input_ids.device, input_ids.shape[0]):
            try:
                fn = _compiled(self.backend, self.mode)
                if input_ids.device.type == "cuda":
                    return _step_thread.run(_run_compiled, fn, input_ids.device, lm, cache, input_ids, position_ids,
                                            attention_mask, kw)
                return fn(lm, cache, input_ids, position_ids, attention_mask, kw).float()
            except Exception as exc:  # noqa: BLE001 - a compiler failure must not end the answer
                self._failed = True
                warnings.warn(f"the compiled forward failed ({type(exc).__name__}: {exc}); "
                              "prefill and decoding continue without compilation", RuntimeWarning, stacklevel=2)
                for layer in cache.layers:  # the write position as before the failed call
                    layer.cumulative_length.fill_(slot)
        return _forward_last(lm, cache, input_ids, position_ids, attention_mask, kw).float()
