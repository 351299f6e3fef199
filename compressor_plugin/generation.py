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
from .text import check_text, control_token_ids, literal_ids



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
    that hold a row's prompt (None: all of them).
    """

    cache: Any
    slots: int
    valid: torch.Tensor | None  # (B, slots) bool
    layouts: list[_Layout]
    logits: torch.Tensor  # (B, vocab) float32
    seconds: float


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
        batch = gen._prefill_batch([lay])
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
        compile: compile the one-token decode step with CUDA graphs
            (``torch.compile(mode="reduce-overhead")``). ``None`` (default): on when the model
            is on a CUDA device and ``cache="static"``, unless the environment variable
            ``COMPRESSOR_PLUGIN_COMPILE`` is ``0``. Ignored on other devices and for batches
            of more than ``decoding.COMPILE_MAX_BATCH`` (8) rows. The first answer of each batch
            size and cache bucket pays the compilation.
    """

    def __init__(self, base: BaseModel, compressor: Any | None = None, *, cache: str = "static",
                 compile: bool | None = None):
        if compressor is None and hasattr(base.model, "peft_config") and not hasattr(base.model, "get_base_model"):
            raise ValueError(
                "this base model carries a compressor's LoRA adapter (injected in place), so it is no longer "
                "the plain base model; pass the compressor too: Generator(compressor.base, compressor), which "
                "disables the adapter for every decoder call")
        if cache not in CACHE_KINDS:
            raise ValueError(f"cache must be one of {CACHE_KINDS}, not {cache!r}")
        from .decoding import DecodeStep, StaticCachePool

        self.base = base
        self.compressor = compressor
        self.rotary = RotaryHelper(base.model)
        self.cache = cache
        if compile is None:
            compile = (cache == "static" and torch.device(base.device).type == "cuda"
                       and os.environ.get("COMPRESSOR_PLUGIN_COMPILE", "1").strip().lower() not in ("0", "false", "no"))
        if compile and cache != "static":
            raise ValueError("compile=True needs cache='static' (CUDA graphs need fixed shapes)")
        self.compile = bool(compile)
        self._step = DecodeStep(self.compile)
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
        """
        nonce = secrets.token_hex(8)  # placeholders no message can spell
        held: dict[str, Segment] = {}

        def hold(seg: Segment) -> str:
            ph = f"\u27e6{nonce}:{len(held)}\u27e7"
            held[ph] = seg
            return ph

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
    def _prefill_batch(self, layouts: Sequence[_Layout]) -> _Batch:
        """Prefill several prompts with one forward (one prompt: no padding, no mask unless it has kv contexts).

        Cache slots of row b: its kv contexts' keys (rotated to their positions) and values in
        ``[0, cached_b)``, zero padding up to the longest ``C``; then its inputs, left-padded to
        the longest ``T``, in ``[C, C + T)``. A 4D mask lets each input see the contexts placed
        before it and the inputs up to itself; a padding input sees only itself (no empty
        attention row) and nobody sees it.
        """
        dev, dt = self.base.device, self.base.dtype
        t0 = time.perf_counter()
        B = len(layouts)
        C = max(lay.cached for lay in layouts)
        T = max(len(lay.ids) for lay in layouts)
        S = C + T
        with self._decoder() as lm:
            cache = new_cache(lm.config)
            if C:  # all chunks of a layer in one update: (B, heads, C, head_dim)
                keys, values = [], []
                for lay in layouts:
                    if lay.placed:
                        k = torch.cat([ctx.keys_at(p, self.rotary) for ctx, p in lay.placed], dim=2)
                        v = torch.cat([ctx.values for ctx, _ in lay.placed], dim=2)
                    else:
                        shape = self._kv_shape()
                        k = v = torch.zeros(shape[0], shape[1], 0, shape[2], dtype=dt, device=dev)
                    padn = C - k.shape[2]
                    keys.append(torch.nn.functional.pad(k, (0, 0, 0, padn)))
                    values.append(torch.nn.functional.pad(v, (0, 0, 0, padn)))
                K, V = torch.stack(keys, dim=1), torch.stack(values, dim=1)  # (layers, B, H, C, D)
                for layer in range(K.shape[0]):
                    cache.update(K[layer], V[layer], layer)
            ids = torch.zeros(B, T, dtype=torch.long)
            pos = torch.zeros(B, T, dtype=torch.long)
            for b, lay in enumerate(layouts):
                n = len(lay.ids)
                ids[b, T - n:] = torch.tensor(lay.ids, dtype=torch.long)
                pos[b, T - n:] = torch.tensor(lay.pos, dtype=torch.long)
            pos_host = pos
            ids, pos = ids.to(dev), pos.to(dev)
            if any(lay.embedded for lay in layouts):
                embeds = lm.get_input_embeddings()(ids)
                for b, lay in enumerate(layouts):
                    off = T - len(lay.ids)
                    for start, emb in lay.embedded:
                        embeds[b, off + start: off + start + emb.shape[0]] = emb.to(embeds.dtype)
                inputs: dict[str, torch.Tensor] = {"inputs_embeds": embeds}
            else:
                inputs = {"input_ids": ids}
            mask = valid = None
            if C or B > 1:
                impl = getattr(lm.config, "_attn_implementation", None) or "eager"
                if impl not in MASKED_ATTENTION:
                    raise PromptError(
                        f"compressed kv contexts and batches need attention that takes a 4D mask "
                        f"({', '.join(MASKED_ATTENTION)}), and this model uses {impl!r}: load it with "
                        "attn_implementation='sdpa' (the default of load_base_model)")
                slot_pos = torch.zeros(B, S, dtype=torch.long)
                valid = torch.zeros(B, S, dtype=torch.bool)
                for b, lay in enumerate(layouts):
                    c = 0
                    for ctx, p in lay.placed:
                        slot_pos[b, c: c + ctx.k] = torch.arange(p, p + ctx.k)
                        c += ctx.k
                    valid[b, :c] = True
                    valid[b, S - len(lay.ids):] = True
                slot_pos[:, C:] = pos_host
                all_valid = bool(valid.all())  # on the host: no device synchronisation
                slot_pos, valid = slot_pos.to(dev), valid.to(dev)
                q_pos, q_valid = slot_pos[:, C:], valid[:, C:]
                is_chunk = torch.arange(S, device=dev) < C
                before = torch.where(is_chunk[None, None, :], slot_pos[:, None, :] < q_pos[:, :, None],
                                     slot_pos[:, None, :] <= q_pos[:, :, None])
                causal = torch.arange(S, device=dev)[None, :] <= (C + torch.arange(T, device=dev))[:, None]
                visible = before & causal[None] & valid[:, None, :]
                own = torch.zeros(T, S, dtype=torch.bool, device=dev)
                own[torch.arange(T, device=dev), C + torch.arange(T, device=dev)] = True
                visible |= own[None] & ~q_valid[:, :, None]  # padding inputs see themselves only
                mask = _attention_mask(visible[:, None], impl, dt)  # (B, 1, T, S)
                if all_valid:
                    valid = None
            out = lm(**inputs, position_ids=pos, attention_mask=mask, use_cache=True, logits_to_keep=1,
                     **cache_kwargs(lm, cache))
            logits = out.logits[:, -1].float()
        _sync(dev)
        return _Batch(cache, S, valid, list(layouts), logits, time.perf_counter() - t0)

    def _kv_shape(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) of the model."""
        cfg = self.base.model.config
        heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        return int(cfg.num_hidden_layers), heads, head_dim

    # ------------------------------------------------------------------ decoding
    def _eos_ids(self) -> set[int]:
        """Token ids that end an answer: the eos ids, and for chat models every special token.

        A chat model that emits a turn marker (``<|im_start|>``, ``<|eot_id|>``...) has finished
        its answer, whatever its configured eos id.
        """
        ids = set()
        for src in (self.tokenizer.eos_token_id, getattr(self.base.model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(x) for x in src)
        if getattr(self.tokenizer, "chat_template", None):
            pad = self.tokenizer.pad_token_id
            ids.update(int(i) for i in getattr(self.tokenizer, "all_special_ids", []) if i != pad or i in ids)
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

    def _token_stream(self, batch: _Batch, cfg: GenerationConfig) -> Iterator[list[int | None]]:
        """Yield, step by step, the chosen token of each row (None once a row finished with eos).

        On a GPU the next decode forward is queued before the chosen tokens are read on the
        host, so the host's work between tokens (stop strings, streaming) overlaps the GPU's.
        """
        dev = self.base.device
        B = len(batch.layouts)
        gen = None
        if cfg.seed is not None:
            gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        eos = set() if cfg.ignore_eos else self._eos_ids()
        steps = cfg.max_new_tokens
        longest = max(lay.length for lay in batch.layouts)
        if self.max_positions is not None:  # the last token chosen is never fed back
            steps = min(steps, self.max_positions - longest + 1)
        if steps <= 0:
            return
        lengths = torch.tensor([lay.length for lay in batch.layouts], device=dev)[:, None]
        S = batch.slots
        static = None
        if self.cache == "static" and steps > 1:
            from .decoding import bucket_length, fill_static

            static = self._pool.acquire(B, bucket_length(S + steps - 1), self.base.dtype, dev)
            if static is not None:
                fill_static(static, batch.cache, S)
        cuda = dev.type == "cuda"
        host = torch.empty(B, dtype=torch.long, pin_memory=True) if cuda else None
        try:
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
        batch = self._prefill_batch(layouts)
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
