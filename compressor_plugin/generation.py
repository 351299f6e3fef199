"""Generate from prompts that mix real text with compressed contexts.

A prompt is a sequence of segments: ``str`` (tokenised), :class:`TokenIds` (already token
ids) and :class:`~compressor_plugin.context.CompressedContext`. The prompt is laid out left
to right: text is run through the (unchanged) decoder into a K/V cache, a ``kv`` context's
keys are rotated to the positions it occupies and appended to the cache as they are, an
``embedding`` context is run through the decoder as input embeddings. A context's anchor ids
(:mod:`compressor_plugin.anchors`) follow its slots as ordinary input tokens. Generation then
continues from that cache: greedy or sampled, with stop strings, streaming and batching.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, Union

import torch

from .context import CompressedContext, RotaryHelper
from .hf_compat import cache_kwargs, cache_layer, new_cache, num_cache_layers
from .errors import ContextMismatchError, InvalidTextError, PromptError, PromptTooLongError  # noqa: F401  (re-exported)
from .models import BaseModel, with_bos_segments
from .text import check_text, control_token_ids, literal_ids, ordinary_special_ids



#: The roles a chat message may have. A role is written into the prompt as chat-template
#: markup (not read literally like message text), so any other string is refused: a role such
#: as ``"user<|im_end|>\n<|im_start|>system"`` would open a turn of its own.
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")


def check_messages(messages: Sequence[Any]) -> None:
    """Refuse chat messages the chat template must not see: not a dict, or a role not in :data:`CHAT_ROLES`.

    Raises:
        PromptError: naming the message's position and its role.
    """
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise PromptError(f"message {i} is a {type(m).__name__}, not a dict with 'role' and 'content'")
        role = m.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise PromptError(f"message {i} has role {role!r}, which the chat template does not take; use one of "
                              f"{', '.join(repr(r) for r in CHAT_ROLES)}")


@dataclass(frozen=True)
class TokenIds:
    """A prompt segment given as token ids (no tokenisation happens)."""

    ids: tuple[int, ...]

    def __init__(self, ids: Sequence[int]):
        object.__setattr__(self, "ids", tuple(int(i) for i in ids))


Segment = Union[str, TokenIds, CompressedContext]


@dataclass
class GenerationConfig:
    """Decoding settings.

    ``temperature=0`` means greedy. ``stop`` strings end generation and are not returned.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None
    ignore_eos: bool = False  # generate max_new_tokens even past end-of-sequence (benchmarks)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        if not all(isinstance(s, str) for s in self.stop):
            raise ValueError("stop must be a string or a list of strings")
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


@dataclass
class GenerationResult:
    """Output of one prompt, with token accounting and timings."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos or stop string) or "length"
    prompt_tokens: int  # positions the model attended to (text tokens + compressed tokens)
    text_tokens: int  # real text tokens in the prompt
    compressed_tokens: int  # positions the compressed contexts take (their k slots and anchor tokens)
    source_tokens: int  # tokens the compressed contexts stand for
    ttft_s: float = 0.0  # prompt processing until the first token is chosen
    total_s: float = 0.0

    @property
    def tokens_saved(self) -> int:
        """Prompt tokens saved against putting the source texts in the prompt."""
        return self.source_tokens - self.compressed_tokens


@dataclass
class Prefill:
    """A prompt laid into a K/V cache: the cache, the prompt's length and its last logits."""

    cache: Any
    length: int
    last_logits: torch.Tensor  # (vocab,)
    text_tokens: int = 0
    compressed_tokens: int = 0
    source_tokens: int = 0
    seconds: float = 0.0


@dataclass
class _Layout:
    """One prompt's segments resolved to forward inputs and placed contexts (no tensors run yet)."""

    ids: list[int]  # the forward's inputs: token ids (0 in embedding slots)
    pos: list[int]  # their positions
    embedded: list[tuple[int, torch.Tensor]]  # (first input index, embeddings)
    placed: list[tuple[CompressedContext, int]]  # kv contexts and their first position
    length: int  # positions the prompt takes
    text_tokens: int = 0
    compressed_tokens: int = 0
    source_tokens: int = 0

    @property
    def cached(self) -> int:
        """Cache slots taken by the kv contexts."""
        return sum(ctx.k for ctx, _ in self.placed)


@dataclass
class _Batch:
    """Prompts prefilled together: cache slots ``[0, slots)`` hold every row's prompt.

    Row b's kv contexts fill slots ``[0, cached_b)`` (padding up to the longest), its forward
    inputs the last ``inputs_b`` slots (left padding before them). ``valid`` marks the slots
    that hold a row's prompt (None: all of them). ``static``: the cache is a pooled static
    cache that decoding continues in (and gives back to the pool); else a DynamicCache.
    """

    cache: Any
    slots: int
    valid: torch.Tensor | None  # (B, slots) bool
    layouts: list[_Layout]
    logits: torch.Tensor  # (B, vocab) float32
    seconds: float
    static: bool = False


class GenerationStream:
    """One answer as text pieces while it is generated, then its :class:`GenerationResult`.

    Iterate it once (it is its own iterator; nothing runs before the first piece is asked
    for). Once the iteration has finished, :attr:`result` holds what :meth:`Generator.generate`
    would have returned: token ids, finish reason, exact token accounting and timings. It
    stays ``None`` if the iteration stopped early.
    """

    def __init__(self, generator: "Generator", segments: Sequence[Segment], config: GenerationConfig):
        self.result: GenerationResult | None = None
        self._pieces = self._run(generator, segments, config)

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    def _run(self, gen: "Generator", segments: Sequence[Segment], cfg: GenerationConfig) -> Iterator[str]:
        t0 = time.perf_counter()
        lay = gen._layout(segments)
        batch = gen._prefill_batch([lay], cfg)
        ttft = None
        state: dict = {"ids": [], "finish": "length", "text": ""}
        for piece in gen._stream_text(batch, cfg, state):
            if ttft is None:
                ttft = time.perf_counter() - t0
            yield piece
        if not state["ids"] and cfg.max_new_tokens:
            state["finish"] = "stop"
        total = time.perf_counter() - t0
        self.result = GenerationResult(state["text"], list(state["ids"]), state["finish"], lay.length,
                                       lay.text_tokens, lay.compressed_tokens, lay.source_tokens,
                                       ttft if ttft is not None else total, total)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MASKED_ATTENTION = ("sdpa", "eager")
"""Attention implementations that accept the custom 4D mask :meth:`Generator.prefill` builds."""

CACHE_KINDS = ("static", "dynamic")


class Generator:
    """Runs the frozen base model over mixed prompts.

    Args:
        base: the loaded base model.
        compressor: optional; when given, its adapter is disabled around every decoder call so
            the decoder is exactly the base model.
        cache: ``"static"`` (default): decoding writes into a preallocated K/V cache
            (:mod:`compressor_plugin.decoding`); ``"dynamic"``: a cache that grows by one
            position per token (the reference path; models with sliding-window layers always
            use it).
        compile: compile the one-token decode step, and the prefill of prompts with at most
            ``decoding.PREFILL_BUCKETS[-1]`` (512) text inputs, with CUDA graphs
            (``torch.compile(mode="reduce-overhead")``). ``None`` (default): on when the model
            is on a CUDA device and ``cache="static"``, unless the environment variable
            ``COMPRESSOR_PLUGIN_COMPILE`` is ``0``. Ignored on other devices and for batches
            of more than ``decoding.COMPILE_MAX_BATCH`` (8) rows. The first answer of each batch
            size, prefill bucket and cache bucket pays the compilation.
        static_prefill: prefill an answer's prompt straight into its static decode cache, text
            inputs left-padded to a prefill bucket (:mod:`compressor_plugin.decoding`), instead
            of into a growing cache that is then copied. ``False`` (default): never. ``True``:
            always where it applies, captured with CUDA graphs where the compiled forward runs
            (CUDA, ``compile``, at most 8 rows) and run eagerly elsewhere (the same layout, e.g.
            to test it on a CPU). ``None``: exactly when the compiled forward runs. Off by
            default because each new (batch, prefill bucket, cache bucket) shape compiles on its
            first answer (about a minute on an H200 with torch 2.11, against ~11 s for the decode
            step alone) and its time-to-first-token gain has not been measured yet. Prompts with
            more than 512 text inputs or with ``embedding`` contexts, and :meth:`prefill`,
            always use the growing cache (the reference path).
    """

    def __init__(self, base: BaseModel, compressor: Any | None = None, *, cache: str = "static",
                 compile: bool | None = None, static_prefill: bool | None = False):
        if compressor is None and hasattr(base.model, "peft_config") and not hasattr(base.model, "get_base_model"):
            raise ValueError(
                "this base model carries a compressor's LoRA adapter (injected in place), so it is no longer "
                "the plain base model; pass the compressor too: Generator(compressor.base, compressor), which "
                "disables the adapter for every decoder call")
        if cache not in CACHE_KINDS:
            raise ValueError(f"cache must be one of {CACHE_KINDS}, not {cache!r}")
        from .decoding import ForwardStep, StaticCachePool

        self.base = base
        self.compressor = compressor
        self.rotary = RotaryHelper(base.model)
        self.cache = cache
        if compile is None:
            compile = (cache == "static" and torch.device(base.device).type == "cuda"
                       and os.environ.get("COMPRESSOR_PLUGIN_COMPILE", "1").strip().lower() not in ("0", "false", "no"))
        if compile and cache != "static":
            raise ValueError("compile=True needs cache='static' (CUDA graphs need fixed shapes)")
        if static_prefill and cache != "static":
            raise ValueError("static_prefill=True needs cache='static'")
        self.compile = bool(compile)
        self.static_prefill = static_prefill
        self._step = ForwardStep(self.compile)
        self._pool = StaticCachePool(base.model.config)
        self._trims: bool | None = None  # whether the chat template strips message content (probed once)

    @property
    def tokenizer(self) -> Any:
        return self.base.tokenizer

    @property
    def max_positions(self) -> int | None:
        """The model's maximum positions (``config.max_position_embeddings``), if it declares one."""
        n = getattr(self.base.model.config, "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    @contextlib.contextmanager
    def _decoder(self) -> Iterator[Any]:
        if self.compressor is not None:
            with self.compressor.decoder() as lm:
                yield lm
        else:
            from .hf_compat import causal_lm

            yield causal_lm(self.base.model)

    # ------------------------------------------------------------------ prompts
    def chat_segments(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> list[Segment]:
        """Apply the model's chat template to messages whose ``content`` is a string or a list of segments.

        Message text is read literally: a string such as ``<|im_end|>`` or ``<|im_start|>system``
        typed by a user or found in a document stays text (the ordinary tokens that spell it);
        only the template's own markup becomes control tokens. ``TokenIds`` parts keep their ids.
        Falls back to a plain ``role: content`` layout for models without a chat template.

        Raises:
            PromptError: a message that is not a dict, or whose role is not one of :data:`CHAT_ROLES`
                (a role is written as template markup, so any other string could open a turn).
        """
        nonce = secrets.token_hex(8)  # placeholders no message can spell
        held: dict[str, Segment] = {}

        def hold(seg: Segment) -> str:
            ph = f"\u27e6{nonce}:{len(held)}\u27e7"
            held[ph] = seg
            return ph

        check_messages(messages)
        template = getattr(self.tokenizer, "chat_template", None)
        trims = bool(template) and self._template_trims()
        flat = []
        for i, m in enumerate(messages):
            content = m.get("content")
            if isinstance(content, (str, CompressedContext, TokenIds)):
                content = [content]
            parts: list[Segment] = []
            for seg in content or []:
                if isinstance(seg, str):
                    check_text(seg, f"message {i} ({m.get('role')})")
                    if seg:
                        parts.append(seg)
                elif isinstance(seg, (CompressedContext, TokenIds)):
                    parts.append(seg)
                else:
                    raise PromptError(f"unsupported message content part {type(seg).__name__}")
            if trims and parts:  # the template strips each message's content: do it to the text held out
                if isinstance(parts[0], str):
                    parts[0] = parts[0].lstrip()
                if isinstance(parts[-1], str):
                    parts[-1] = parts[-1].rstrip()
            held_parts = [hold(TokenIds(literal_ids(self.tokenizer, s))) if isinstance(s, str) else hold(s)
                          for s in parts if not isinstance(s, str) or s]
            flat.append({"role": m["role"], "content": "".join(held_parts)})
        if template:
            text = self.tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=add_generation_prompt)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in flat) + ("assistant:" if add_generation_prompt else "")
        if not held:
            return [text]
        pattern = "(" + "|".join(re.escape(p) for p in held) + ")"
        return [held.get(p, p) for p in re.split(pattern, text) if p]

    def _template_trims(self) -> bool:
        """Whether the chat template strips the whitespace around a message's content (Llama 3, Gemma do)."""
        if self._trims is None:
            probe = "\u27e6probe\u27e7"
            try:
                text = self.tokenizer.apply_chat_template([{"role": "user", "content": f" {probe} "}], tokenize=False,
                                                          add_generation_prompt=False)
            except Exception:  # a template that refuses a lone user turn: assume it keeps content as it is
                text = f" {probe} "
            self._trims = f" {probe} " not in text
        return self._trims

    def _check(self, ctx: CompressedContext) -> None:
        if ctx.base_fingerprint != self.base.fingerprint:
            raise ContextMismatchError(
                f"a compressed context was made for base model {ctx.base_fingerprint}, "
                f"but this generator runs {self.base.name} ({self.base.fingerprint})")
        cfg = self.base.model.config
        if ctx.mode == "kv" and ctx.keys.shape[0] != cfg.num_hidden_layers:
            raise ContextMismatchError("the context's layer count differs from the model's")
        # the fingerprint is a public string: check every dimension, so a context of another shape
        # is refused here instead of failing inside attention (or, for a width of 1, being broadcast)
        if ctx.mode == "kv":
            layers, heads, head_dim = self._kv_shape()
            got, want = tuple(ctx.keys.shape), (layers, heads, ctx.k, head_dim)
        else:
            got, want = tuple(ctx.embeddings.shape), (ctx.k, int(self.base.model.get_input_embeddings().embedding_dim))
        if got != want:
            raise ContextMismatchError(f"the context's {ctx.mode} tensors have shape {got}; this model needs {want}")
        if ctx.anchor_ids is not None and ctx.anchor_count:
            from .store import check_anchor_ids

            try:
                check_anchor_ids(ctx.anchor_ids, self.base.vocab_size, control_token_ids(self.tokenizer))
            except ValueError as exc:
                raise ContextMismatchError(f"the context's anchors do not fit this model: {exc}") from None

    def _layout(self, segments: Sequence[Segment], where: str = "the prompt") -> _Layout:
        """Resolve segments to forward inputs and placed contexts; validate the prompt."""
        if isinstance(segments, (str, CompressedContext, TokenIds)):
            segments = [segments]
        if not segments:
            raise PromptError(f"{where} is empty")
        segments = with_bos_segments(self.tokenizer, segments)  # the BOS of models that need one (Gemma)
        dev, dt = self.base.device, self.base.dtype
        lay = _Layout([], [], [], [], 0)
        ends_with_kv = False
        for i, seg in enumerate(segments):
            if isinstance(seg, (str, TokenIds)):
                if isinstance(seg, str):
                    check_text(seg, f"segment {i} of {where}")
                ids = seg.ids if isinstance(seg, TokenIds) else (
                    self.tokenizer(seg, add_special_tokens=False)["input_ids"] if seg else [])
                lay.ids.extend(ids)
                lay.pos.extend(range(lay.length, lay.length + len(ids)))
                lay.length += len(ids)
                lay.text_tokens += len(ids)
                ends_with_kv = ends_with_kv and not ids
            elif isinstance(seg, CompressedContext):
                self._check(seg)
                ctx = seg.to(dev, dt)
                if ctx.mode == "kv":
                    lay.placed.append((ctx, lay.length))
                    ends_with_kv = True
                else:
                    lay.embedded.append((len(lay.ids), ctx.embeddings))
                    lay.ids.extend([0] * ctx.k)
                    lay.pos.extend(range(lay.length, lay.length + ctx.k))
                    ends_with_kv = False
                lay.length += ctx.k
                anchors = seg.anchor_list()
                if anchors:  # the chunk's anchor ids, read as text right after its slots
                    lay.ids.extend(anchors)
                    lay.pos.extend(range(lay.length, lay.length + len(anchors)))
                    lay.length += len(anchors)
                    ends_with_kv = False
                lay.compressed_tokens += ctx.k + len(anchors)
                lay.source_tokens += ctx.source_tokens
            else:
                raise PromptError(f"unsupported prompt segment {type(seg).__name__}; use str, TokenIds or CompressedContext")
        if ends_with_kv or not lay.ids:
            raise PromptError(f"{where} must end with text (for example the question), not a compressed context")
        limit = self.max_positions
        if limit is not None and lay.length > limit:
            raise PromptTooLongError(
                f"{where} takes {lay.length} positions ({lay.text_tokens} text tokens, {lay.compressed_tokens} "
                f"compressed tokens), more than the {limit} positions of {self.base.name}; shorten it or use fewer "
                "or compressed chunks")
        return lay

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, segments: Sequence[Segment]) -> Prefill:
        """Lay the prompt into a fresh K/V cache in one forward; return it with the last logits.

        Every position gets its place in prompt order: text tokens and ``embedding`` contexts
        are the forward's inputs; the keys of each ``kv`` context are rotated to their slot and
        put in the cache first. A mask then lets each input position see the cached contexts
        placed before it (and not those after), so the result equals reading the prompt
        left to right, segment by segment, with a single forward pass.

        Raises:
            PromptTooLongError: the prompt takes more positions than the model has.
            InvalidTextError: prompt text holds a lone surrogate.
        """
        lay = self._layout(segments)
        b = self._prefill_batch([lay])
        return Prefill(b.cache, lay.length, b.logits[0], lay.text_tokens, lay.compressed_tokens, lay.source_tokens,
                       b.seconds)

    @torch.no_grad()
    def _prefill_batch(self, layouts: Sequence[_Layout], cfg: GenerationConfig | None = None) -> _Batch:
        """Prefill several prompts with one forward (one prompt: no padding, no mask unless it has kv contexts).

        Cache slots of row b: its kv contexts' keys (rotated to their positions) and values in
        ``[0, cached_b)``, zero padding up to the longest ``C``; then its inputs, left-padded to
        ``T`` inputs, in ``[C, C + T)``. A 4D mask lets each input see the contexts placed
        before it and the inputs up to itself; a padding input sees only itself (no empty
        attention row) and nobody sees it.

        ``T`` is the longest row's inputs and the cache a growing DynamicCache (the reference
        path), unless an answer follows (``cfg``) and :meth:`_static_prefill_cache` picks a
        pooled static cache: then ``T`` is a prefill bucket, the contexts are written into the
        static cache and the forward is the :class:`~compressor_plugin.decoding.ForwardStep`
        (compiled where it is active); decoding continues in that cache.
        """
        from .decoding import fill_static, prefill_bucket

        dev, dt = self.base.device, self.base.dtype
        t0 = time.perf_counter()
        B = len(layouts)
        C = max(lay.cached for lay in layouts)
        T = max(len(lay.ids) for lay in layouts)
        static = self._static_prefill_cache(layouts, cfg)
        if static is not None:
            T = prefill_bucket(T)
        S = C + T
        width = static.layers[0].max_cache_len if static is not None else S  # the mask's key slots
        try:
            with self._decoder() as lm:
                ids, slot_pos, valid = _slot_layout(layouts, C, T, width)
                pos = slot_pos[:, C:S].to(dev)
                ids = ids.to(dev)
                kv = self._placed_kv(layouts, C, slot_pos[:, :C]) if C or static is not None else None
                if any(lay.embedded for lay in layouts):
                    embeds = lm.get_input_embeddings()(ids)
                    for b, lay in enumerate(layouts):
                        off = T - len(lay.ids)
                        for start, emb in lay.embedded:
                            embeds[b, off + start: off + start + emb.shape[0]] = emb.to(embeds.dtype)
                    inputs: dict[str, torch.Tensor] = {"inputs_embeds": embeds}
                else:
                    inputs = {"input_ids": ids}
                mask = valid_dev = None
                if static is not None or C or B > 1:
                    impl = getattr(lm.config, "_attn_implementation", None) or "eager"
                    if impl not in MASKED_ATTENTION:
                        raise PromptError(
                            f"compressed kv contexts and batches need attention that takes a 4D mask "
                            f"({', '.join(MASKED_ATTENTION)}), and this model uses {impl!r}: load it with "
                            "attn_implementation='sdpa' (the default of load_base_model)")
                    all_valid = bool(valid[:, :S].all())  # on the host: no device synchronisation
                    slot_pos, valid_dev = slot_pos.to(dev), valid.to(dev)
                    mask = _prefill_mask(slot_pos, valid_dev, C, T, impl, dt)
                    valid_dev = None if all_valid else valid_dev[:, :S]
                if static is not None:
                    fill_static(static, kv, C)
                    logits = self._step(lm, static, ids, pos, mask, C)
                    cache = static
                else:
                    cache = new_cache(lm.config, kv)
                    out = lm(**inputs, position_ids=pos, attention_mask=mask, use_cache=True,
                             logits_to_keep=last_position(T, dev), **cache_kwargs(lm, cache))
                    logits = out.logits[:, -1].float()
            _sync(dev)
        except BaseException:
            if static is not None:
                self._pool.release(static)
            raise
        return _Batch(cache, S, valid_dev, list(layouts), logits, time.perf_counter() - t0, static is not None)

    def _static_prefill_cache(self, layouts: Sequence[_Layout], cfg: GenerationConfig | None) -> Any:
        """The pooled static cache to prefill ``layouts`` into, or None for the eager prefill into a DynamicCache.

        The one place that decides between the two. A static prefill needs the static cache,
        an answer to follow (``cfg``, which sizes the cache), at most
        ``decoding.PREFILL_BUCKETS[-1]`` inputs per row (longer prompts are bound by arithmetic,
        not launch overhead), no ``embedding`` context, attention that takes a 4D mask and a
        model whose layers are all full attention. It runs when ``static_prefill`` is True, or
        (``None``) when the compiled forward is active for this device and batch size.
        """
        from .decoding import bucket_length, prefill_bucket

        if cfg is None or self.cache != "static" or self.static_prefill is False:
            return None
        dev, B = self.base.device, len(layouts)
        if self.static_prefill is None and not self._step.active(dev, B):
            return None
        T = prefill_bucket(max(len(lay.ids) for lay in layouts))
        impl = getattr(self.base.model.config, "_attn_implementation", None) or "eager"
        steps = self._decode_steps(layouts, cfg)
        if T is None or steps < 1 or impl not in MASKED_ATTENTION or any(lay.embedded for lay in layouts):
            return None
        C = max(lay.cached for lay in layouts)
        return self._pool.acquire(B, bucket_length(C + T + steps - 1), self.base.dtype, dev)

    def _placed_kv(self, layouts: Sequence[_Layout], C: int,
                   positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every row's kv contexts as cache entries: per layer, keys rotated to their positions
        and values, ``(B, heads, C, head_dim)``, zero after a row's own contexts.

        ``positions``: ``(B, C)`` the position of each slot (any for padding). All rows,
        contexts and layers are rotated by one call, a few operators whatever their number.
        """
        dev, dt = self.base.device, self.base.dtype
        L, H, D = self._kv_shape()
        if not C:  # nothing placed: empty entries (a static cache still takes its shapes from them)
            empty = torch.zeros(len(layouts), H, 0, D, dtype=dt, device=dev)
            return [(empty, empty)] * L
        keys, values = [], []
        for lay in layouts:
            ks = [ctx.keys for ctx, _ in lay.placed]
            vs = [ctx.values for ctx, _ in lay.placed]
            if lay.cached < C:
                ks.append(torch.zeros(L, H, C - lay.cached, D, dtype=dt, device=dev))
                vs.append(ks[-1])
            keys.append(torch.cat(ks, dim=2) if len(ks) > 1 else ks[0])
            values.append(torch.cat(vs, dim=2) if len(vs) > 1 else vs[0])
        # (B, layers, heads, C, head_dim): the layer axis at -4, as per-layer rotary frequencies need
        K = self.rotary.rotate(torch.stack(keys), positions.to(dev)[:, None, None, :])
        V = torch.stack(values)
        return [(K[:, i], V[:, i]) for i in range(L)]

    def _kv_shape(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) of the model."""
        from .models import kv_dims

        return kv_dims(self.base.model.config)

    # ------------------------------------------------------------------ decoding
    def _eos_ids(self) -> set[int]:
        """Token ids that end an answer: the eos ids, and for chat models every special token.

        A chat model that emits a turn marker (``<|im_start|>``, ``<|eot_id|>``...) has finished
        its answer, whatever its configured eos id. The pad token, and an ordinary token named as
        a special one (``tokenizer.sep_token = "The"``, see
        :func:`~compressor_plugin.text.ordinary_special_ids`), do not end it unless they are eos ids.
        """
        ids = set()
        for src in (self.tokenizer.eos_token_id, getattr(self.base.model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(x) for x in src)
        if getattr(self.tokenizer, "chat_template", None):
            pad = self.tokenizer.pad_token_id
            ordinary = ordinary_special_ids(self.tokenizer)
            ids.update(int(i) for i in getattr(self.tokenizer, "all_special_ids", [])
                       if i is not None and (i in ids or (i != pad and i not in ordinary)))
        return ids

    @staticmethod
    def _select(logits: torch.Tensor, cfg: GenerationConfig, gen: torch.Generator | None) -> torch.Tensor:
        """Next token per row from ``(B, vocab)`` logits."""
        if cfg.temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / cfg.temperature, -1)
        if cfg.top_p < 1.0:
            sp, si = probs.sort(-1, descending=True)
            keep = sp.cumsum(-1) - sp < cfg.top_p
            sp = sp * keep
            choice = torch.multinomial(sp / sp.sum(-1, keepdim=True), 1, generator=gen).squeeze(-1)
            return si.gather(-1, choice[:, None]).squeeze(-1)
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

    def _decode_steps(self, layouts: Sequence[_Layout], cfg: GenerationConfig) -> int:
        """Tokens to choose: ``max_new_tokens``, fewer where the longest prompt nears the model's last position."""
        steps = cfg.max_new_tokens
        if self.max_positions is not None:  # the last token chosen is never fed back
            steps = min(steps, self.max_positions - max(lay.length for lay in layouts) + 1)
        return steps

    def _token_stream(self, batch: _Batch, cfg: GenerationConfig) -> Iterator[list[int | None]]:
        """Yield, step by step, the chosen token of each row (None once a row finished with eos).

        Decoding continues in the batch's static cache, or copies a growing prompt cache once
        into a static one (``cache="static"``), or grows it (``cache="dynamic"``). On a GPU the
        next decode forward is queued before the chosen tokens are read on the host, so the
        host's work between tokens (stop strings, streaming) overlaps the GPU's.
        """
        dev = self.base.device
        B = len(batch.layouts)
        steps = self._decode_steps(batch.layouts, cfg)
        S = batch.slots
        static = batch.cache if batch.static else None
        try:
            if steps <= 0:
                return
            gen = None
            if cfg.seed is not None:
                gen = torch.Generator(device=dev).manual_seed(cfg.seed)
            eos = set() if cfg.ignore_eos else self._eos_ids()
            lengths = torch.tensor([lay.length for lay in batch.layouts], device=dev)[:, None]
            if static is None and self.cache == "static" and steps > 1:
                from .decoding import bucket_length, fill_static

                static = self._pool.acquire(B, bucket_length(S + steps - 1), self.base.dtype, dev)
                if static is not None:
                    layers = range(num_cache_layers(batch.cache))
                    fill_static(static, [cache_layer(batch.cache, i) for i in layers], S)
            cuda = dev.type == "cuda"
            host = torch.empty(B, dtype=torch.long, pin_memory=True) if cuda else None
            if static is not None:
                impl = getattr(self.base.model.config, "_attn_implementation", None) or "eager"
                visible = torch.zeros(B, 1, 1, static.layers[0].max_cache_len, dtype=torch.bool, device=dev)
                visible[:, 0, 0, :S] = True if batch.valid is None else batch.valid
                mask = _attention_mask(visible, impl, self.base.dtype)
                cache = static
            else:
                cache = batch.cache
                mask = None if batch.valid is None else batch.valid.long()
            batch.cache = None  # the prompt cache is copied (static) or owned by this loop now
            logits = batch.logits
            done = [False] * B
            for step in range(steps):
                nxt = self._select(logits, cfg, gen)
                if cuda:
                    host.copy_(nxt, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record()
                if step < steps - 1:  # queue the next forward first: it runs while the host reads this token
                    slot = S + step
                    with torch.no_grad(), self._decoder() as lm:
                        if static is not None:
                            mask[:, :, :, slot] = True if mask.dtype == torch.bool else 0.0
                            logits = self._step(lm, cache, nxt[:, None], lengths + step, mask, slot)
                        else:
                            if mask is not None:
                                mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=dev)], dim=1)
                            out = lm(input_ids=nxt[:, None], position_ids=lengths + step, attention_mask=mask,
                                     use_cache=True, **cache_kwargs(lm, cache))
                            logits = out.logits[:, -1].float()
                if cuda:
                    ready.synchronize()
                    toks = host.tolist()
                else:
                    toks = nxt.tolist()
                row: list[int | None] = []
                for b, t in enumerate(toks):
                    if done[b] or t in eos:
                        done[b] = True
                        row.append(None)
                    else:
                        row.append(t)
                yield row
                if all(done):
                    return
        finally:
            if static is not None:
                self._pool.release(static)

    # ------------------------------------------------------------------ public API
    def stream(self, segments: Sequence[Segment], config: GenerationConfig | None = None, **kwargs: Any) -> Iterator[str]:
        """Yield the answer as text pieces while it is generated (stop strings are honoured)."""
        yield from self.stream_result(segments, config, **kwargs)

    def stream_result(self, segments: Sequence[Segment], config: GenerationConfig | None = None,
                      **kwargs: Any) -> GenerationStream:
        """Like :meth:`stream`, as a :class:`GenerationStream` whose ``result`` (token ids, finish
        reason, token accounting) is set once the pieces are exhausted."""
        return GenerationStream(self, segments, _make_config(config, kwargs))

    def _stream_text(self, batch: _Batch, cfg: GenerationConfig, state: dict[str, Any]) -> Iterator[str]:
        """Single-row text streaming: yields new text; ``state`` gets the ids, text and finish reason
        (also when no text was yielded, e.g. an answer of special tokens only)."""
        ids: list[int] = state["ids"]
        emitted = 0
        hold = max((len(s) for s in cfg.stop), default=0)
        for row in self._token_stream(batch, cfg):
            t = row[0]
            if t is None:
                state["finish"] = "stop"
                break
            ids.append(t)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = _find_stop(text, cfg.stop)
            if cut is not None:
                state["finish"] = "stop"
                text = text[:cut]
                state["text"] = text
                if len(text) > emitted:
                    yield text[emitted:]
                return
            state["text"] = text
            safe = len(text) - hold if hold else len(text)
            if text.endswith("\ufffd"):
                safe = min(safe, len(text) - 1)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        text = state["text"]
        if len(text) > emitted:
            yield text[emitted:]

    def generate(self, segments: Sequence[Segment], config: GenerationConfig | None = None, **kwargs: Any) -> GenerationResult:
        """Generate a completion for one prompt.

        Raises:
            PromptError: an empty prompt, one that ends with a compressed context, or an unsupported segment.
            PromptTooLongError: the prompt takes more positions than the model has.
            InvalidTextError: prompt text holds a lone surrogate.
            ContextMismatchError: a compressed context made for another base model.
        """
        stream = self.stream_result(segments, config, **kwargs)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def generate_batch(self, prompts: Sequence[Sequence[Segment]], config: GenerationConfig | None = None,
                       **kwargs: Any) -> list[GenerationResult]:
        """Generate for several prompts at once: one batched prefill forward, one batched decode loop."""
        cfg = _make_config(config, kwargs)
        if not prompts:
            return []
        t0 = time.perf_counter()
        layouts = [self._layout(p, f"prompt {i}") for i, p in enumerate(prompts)]
        batch = self._prefill_batch(layouts, cfg)
        ids: list[list[int]] = [[] for _ in layouts]
        finish = ["length"] * len(layouts)
        texts = [""] * len(layouts)
        stopped = [False] * len(layouts)
        ttft = None
        for row in self._token_stream(batch, cfg):
            if ttft is None:
                ttft = time.perf_counter() - t0
            for b, t in enumerate(row):
                if stopped[b]:
                    continue
                if t is None:
                    stopped[b], finish[b] = True, "stop"
                    continue
                ids[b].append(t)
                if cfg.stop:
                    text = self.tokenizer.decode(ids[b], skip_special_tokens=True)
                    cut = _find_stop(text, cfg.stop)
                    if cut is not None:
                        stopped[b], finish[b], texts[b] = True, "stop", text[:cut]
            if all(stopped):
                break
        total = time.perf_counter() - t0
        out = []
        for b, lay in enumerate(layouts):
            text = texts[b] if (stopped[b] and cfg.stop and finish[b] == "stop" and texts[b]) else \
                self.tokenizer.decode(ids[b], skip_special_tokens=True)
            cut = _find_stop(text, cfg.stop)
            if cut is not None:
                text = text[:cut]
            out.append(GenerationResult(text, ids[b], finish[b], lay.length, lay.text_tokens, lay.compressed_tokens,
                                        lay.source_tokens, ttft or total, total))
        return out

    @torch.no_grad()
    def context_from_text(self, text: str | Sequence[int], *, start: int = 0) -> CompressedContext:
        """The exact (uncompressed) K/V of a text as a context: one compressed token per text token.

        Useful as a reference: it stores what plain prefix caching would store. ``start`` is the
        position the text is computed at (keys are stored position-free either way).
        """
        ids = list(text) if not isinstance(text, str) else self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise PromptError("empty text")
        dev = self.base.device
        with self._decoder() as lm:
            cache = new_cache(lm.config)
            pos = torch.arange(start, start + len(ids), device=dev)
            lm(input_ids=torch.tensor([ids], device=dev), position_ids=pos[None], use_cache=True,
               logits_to_keep=1, **cache_kwargs(lm, cache))
            ks, vs = zip(*(cache_layer(cache, i) for i in range(num_cache_layers(cache))))
        keys = torch.stack([k[0] for k in ks])  # (L, H, T, D)
        values = torch.stack([v[0] for v in vs])
        keys = self.rotary.unrotate(keys, pos)
        return CompressedContext("kv", len(ids), self.base.fingerprint, "identity", keys=keys, values=values)


def last_position(length: int, device: torch.device | str) -> int | torch.Tensor:
    """``logits_to_keep`` for the logits of the last of ``length`` positions only.

    An index tensor rather than the int 1 when ``length > 1``: for an int, transformers slices
    the hidden states, and that ``(batch, 1, hidden)`` view keeps the stride of the whole
    sequence, on which torch's CPU bf16 ``linear`` takes a slow path (the default model's
    49,152 x 576 head: 69 ms against 4.8 ms for the same values laid out plainly, torch 2.13 on
    a 2-core CPU). Indexing with a tensor copies the one position into a plain tensor.
    """
    return 1 if length == 1 else torch.tensor([length - 1], device=device)


def _slot_layout(layouts: Sequence[_Layout], C: int, T: int,
                 width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host tensors of a prefill: input ids ``(B, T)`` (left padding 0), and the position and
    validity of every cache slot ``(B, width)``.

    Row b: its kv contexts in ``[0, cached_b)``, invalid padding up to ``C``, its inputs in the
    last ``len(ids)`` slots of ``[C, C + T)`` after invalid padding (position 0); slots from
    ``C + T`` on are invalid.
    """
    B = len(layouts)
    ids = torch.zeros(B, T, dtype=torch.long)
    slot_pos = torch.zeros(B, width, dtype=torch.long)
    valid = torch.zeros(B, width, dtype=torch.bool)
    for b, lay in enumerate(layouts):
        n, c = len(lay.ids), lay.cached
        if c:
            slot_pos[b, :c] = torch.tensor([i for ctx, p in lay.placed for i in range(p, p + ctx.k)])
            valid[b, :c] = True
        ids[b, T - n:] = torch.tensor(lay.ids, dtype=torch.long)
        slot_pos[b, C + T - n: C + T] = torch.tensor(lay.pos, dtype=torch.long)
        valid[b, C + T - n: C + T] = True
    return ids, slot_pos, valid


def _prefill_mask(slot_pos: torch.Tensor, valid: torch.Tensor, C: int, T: int, impl: str,
                  dtype: torch.dtype) -> torch.Tensor:
    """The ``(B, 1, T, width)`` mask of a prefill whose inputs fill slots ``[C, C + T)``.

    ``slot_pos``, ``valid``: ``(B, width)`` as :func:`_slot_layout` makes them. An input sees
    the valid context slots placed before its position and the valid inputs up to itself; a
    padding input sees only itself (no empty attention row).
    """
    slot = torch.arange(slot_pos.shape[1], device=slot_pos.device)
    q_slot = slot[C:C + T]
    q_pos, q_valid = slot_pos[:, C:C + T, None], valid[:, C:C + T, None]
    keys = slot_pos[:, None, :]
    before = torch.where(slot < C, keys < q_pos, keys <= q_pos)  # (B, T, width)
    visible = before & (slot <= q_slot[:, None]) & valid[:, None, :]
    visible |= (slot == q_slot[:, None]) & ~q_valid
    return _attention_mask(visible[:, None], impl, dtype)


def _attention_mask(visible: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """A 4D mask from a boolean "may attend" tensor: boolean for ``sdpa``, additive for ``eager``."""
    if impl == "sdpa":
        return visible
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, torch.finfo(dtype).min)


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the first stop string after the answer's first non-whitespace character.

    Leading whitespace never stops generation, so an answer that starts with a newline is
    not cut to nothing by a ``"\n"`` stop string.
    """
    start = len(text) - len(text.lstrip())
    if start == len(text):
        return None
    cuts = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(cuts) if cuts else None


def _make_config(config: GenerationConfig | None, kwargs: dict[str, Any]) -> GenerationConfig:
    """A GenerationConfig from either an object or keyword arguments, never both silently."""
    if config is not None and kwargs:
        raise TypeError(f"pass either config or keyword options, not both (got {sorted(kwargs)})")
    return config or GenerationConfig(**kwargs)
