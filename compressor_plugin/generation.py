"""Generate from prompts that mix real text with compressed contexts.

A prompt is a sequence of segments: ``str`` (tokenised), :class:`TokenIds` (already token
ids) and :class:`~compressor_plugin.context.CompressedContext`. The prompt is laid out left
to right: text is run through the (unchanged) decoder into a K/V cache, a ``kv`` context's
keys are rotated to the positions it occupies and appended to the cache as they are, an
``embedding`` context is run through the decoder as input embeddings. Generation then
continues from that cache: greedy or sampled, with stop strings, streaming and batching.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, Union

import torch

from .context import CompressedContext, RotaryHelper
from .hf_compat import cache_kwargs, cache_layer, new_cache, num_cache_layers
from .models import BaseModel, with_bos_segments


class PromptError(ValueError):
    """A prompt that cannot be generated from."""


class ContextMismatchError(PromptError):
    """A compressed context made for another base model."""


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
    compressed_tokens: int  # compressed tokens in the prompt
    source_tokens: int  # tokens the compressed contexts stand for
    ttft_s: float = 0.0  # prompt processing until the first token is chosen
    total_s: float = 0.0

    @property
    def tokens_saved(self) -> int:
        """Prompt tokens saved against putting the source texts in the prompt."""
        return self.source_tokens - self.compressed_tokens


@dataclass
class Prefill:
    cache: Any
    length: int
    last_logits: torch.Tensor  # (vocab,)
    text_tokens: int = 0
    compressed_tokens: int = 0
    source_tokens: int = 0
    seconds: float = 0.0


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
        pre = gen.prefill(segments)
        ttft = None
        state: dict = {"ids": [], "finish": "length", "text": ""}
        for piece, state in gen._stream_text([pre], cfg):
            if ttft is None:
                ttft = time.perf_counter() - t0
            yield piece
        if not state["ids"] and cfg.max_new_tokens:
            state["finish"] = "stop"
        total = time.perf_counter() - t0
        self.result = GenerationResult(state["text"], list(state["ids"]), state["finish"], pre.length,
                                       pre.text_tokens, pre.compressed_tokens, pre.source_tokens,
                                       ttft if ttft is not None else total, total)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MASKED_ATTENTION = ("sdpa", "eager")
"""Attention implementations that accept the custom 4D mask :meth:`Generator.prefill` builds."""


class Generator:
    """Runs the frozen base model over mixed prompts.

    Args:
        base: the loaded base model.
        compressor: optional; when given, its adapter is disabled around every decoder call so
            the decoder is exactly the base model.
    """

    def __init__(self, base: BaseModel, compressor: Any | None = None):
        if compressor is None and hasattr(base.model, "peft_config") and not hasattr(base.model, "get_base_model"):
            raise ValueError(
                "this base model carries a compressor's LoRA adapter (injected in place), so it is no longer "
                "the plain base model; pass the compressor too: Generator(compressor.base, compressor), which "
                "disables the adapter for every decoder call")
        self.base = base
        self.compressor = compressor
        self.rotary = RotaryHelper(base.model)

    @property
    def tokenizer(self) -> Any:
        return self.base.tokenizer

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

        Falls back to a plain ``role: content`` layout for models without a chat template.
        """
        placeholders: dict[str, CompressedContext] = {}
        flat = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, (str, CompressedContext, TokenIds)):
                content = [content]
            parts = []
            for seg in content or []:
                if isinstance(seg, CompressedContext):
                    ph = f"\u27e6cc{len(placeholders)}\u27e7"
                    placeholders[ph] = seg
                    parts.append(ph)
                elif isinstance(seg, TokenIds):
                    parts.append(self.tokenizer.decode(list(seg.ids)))
                elif isinstance(seg, str):
                    parts.append(seg)
                else:
                    raise PromptError(f"unsupported message content part {type(seg).__name__}")
            flat.append({"role": m["role"], "content": "".join(parts)})
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=add_generation_prompt)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in flat) + ("assistant:" if add_generation_prompt else "")
        if not placeholders:
            return [text]
        pattern = "(" + "|".join(re.escape(p) for p in placeholders) + ")"
        return [placeholders.get(p, p) for p in re.split(pattern, text) if p]

    def _check(self, ctx: CompressedContext) -> None:
        if ctx.base_fingerprint != self.base.fingerprint:
            raise ContextMismatchError(
                f"a compressed context was made for base model {ctx.base_fingerprint}, "
                f"but this generator runs {self.base.name} ({self.base.fingerprint})")
        cfg = self.base.model.config
        if ctx.mode == "kv" and ctx.keys.shape[0] != cfg.num_hidden_layers:
            raise ContextMismatchError("the context's layer count differs from the model's")

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, segments: Sequence[Segment]) -> Prefill:
        """Lay the prompt into a fresh K/V cache in one forward; return it with the last logits.

        Every position gets its place in prompt order: text tokens and ``embedding`` contexts
        are the forward's inputs; the keys of each ``kv`` context are rotated to their slot and
        put in the cache first. A mask then lets each input position see the cached contexts
        placed before it (and not those after), so the result equals reading the prompt
        left to right, segment by segment, with a single forward pass.
        """
        if isinstance(segments, (str, CompressedContext, TokenIds)):
            segments = [segments]
        if not segments:
            raise PromptError("the prompt is empty")
        segments = with_bos_segments(self.tokenizer, segments)  # the BOS of models that need one (Gemma)
        dev, dt = self.base.device, self.base.dtype
        t0 = time.perf_counter()
        live_ids: list[int] = []  # the forward's inputs: token ids (0 in embedding slots)
        live_pos: list[int] = []
        embedded: list[tuple[int, torch.Tensor]] = []  # (first input index, embeddings)
        placed: list[tuple[CompressedContext, int]] = []  # kv contexts and their first position
        counts = {"text": 0, "comp": 0, "src": 0}
        pos = 0
        ends_with_kv = False
        for seg in segments:
            if isinstance(seg, (str, TokenIds)):
                ids = seg.ids if isinstance(seg, TokenIds) else (
                    self.tokenizer(seg, add_special_tokens=False)["input_ids"] if seg else [])
                live_ids.extend(ids)
                live_pos.extend(range(pos, pos + len(ids)))
                pos += len(ids)
                counts["text"] += len(ids)
                ends_with_kv = ends_with_kv and not ids
            elif isinstance(seg, CompressedContext):
                self._check(seg)
                ctx = seg.to(dev, dt)
                if ctx.mode == "kv":
                    placed.append((ctx, pos))
                    ends_with_kv = True
                else:
                    embedded.append((len(live_ids), ctx.embeddings))
                    live_ids.extend([0] * ctx.k)
                    live_pos.extend(range(pos, pos + ctx.k))
                    ends_with_kv = False
                pos += ctx.k
                counts["comp"] += ctx.k
                counts["src"] += ctx.source_tokens
            else:
                raise PromptError(f"unsupported prompt segment {type(seg).__name__}; use str, TokenIds or CompressedContext")
        if ends_with_kv or not live_ids:
            raise PromptError("the prompt must end with text (for example the question), not a compressed context")
        with self._decoder() as lm:
            cache = new_cache(lm.config)
            cached_pos: list[int] = []
            if placed:  # all chunks of a layer in one update: (1, heads, sum of k, head_dim)
                keys = torch.cat([ctx.keys_at(p, self.rotary) for ctx, p in placed], dim=2)
                values = torch.cat([ctx.values for ctx, _ in placed], dim=2)
                for layer in range(keys.shape[0]):
                    cache.update(keys[layer][None], values[layer][None], layer)
                for ctx, p in placed:
                    cached_pos.extend(range(p, p + ctx.k))
            q_pos = torch.tensor(live_pos, device=dev)
            if embedded:
                embeds = lm.get_input_embeddings()(torch.tensor([live_ids], device=dev))
                for start, emb in embedded:
                    embeds[0, start: start + emb.shape[0]] = emb.to(embeds.dtype)
                inputs: dict[str, torch.Tensor] = {"inputs_embeds": embeds}
            else:
                inputs = {"input_ids": torch.tensor([live_ids], device=dev)}
            mask = None
            if cached_pos:
                impl = getattr(lm.config, "_attn_implementation", None) or "eager"
                if impl not in MASKED_ATTENTION:
                    raise PromptError(
                        f"compressed kv contexts need attention that takes a 4D mask ({', '.join(MASKED_ATTENTION)}), "
                        f"and this model uses {impl!r}: load it with attn_implementation='sdpa' (the default of "
                        "load_base_model)")
                c_pos = torch.tensor(cached_pos, device=dev)
                visible = torch.cat([c_pos[None, :] < q_pos[:, None], q_pos[None, :] <= q_pos[:, None]], dim=1)
                mask = torch.zeros(visible.shape, dtype=dt, device=dev).masked_fill_(~visible, torch.finfo(dt).min)
                mask = mask[None, None]  # (1, 1, inputs, cached + inputs): a ready 4D mask
            out = lm(**inputs, position_ids=q_pos[None], attention_mask=mask, use_cache=True, logits_to_keep=1,
                     **cache_kwargs(lm, cache))
            logits = out.logits[0, -1].float()
        _sync(dev)
        return Prefill(cache, pos, logits, counts["text"], counts["comp"], counts["src"], time.perf_counter() - t0)

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

    def _token_stream(self, prefills: list[Prefill], cfg: GenerationConfig) -> Iterator[list[int | None]]:
        """Yield, step by step, the chosen token of each row (None once a row finished with eos)."""
        dev = self.base.device
        B = len(prefills)
        gen = None
        if cfg.seed is not None:
            gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        eos = self._eos_ids()
        if B == 1:
            cache, mask = prefills[0].cache, None
        else:
            cache, mask = self._merge(prefills)
        lengths = torch.tensor([p.length for p in prefills], device=dev)
        logits = torch.stack([p.last_logits for p in prefills])
        done = [False] * B
        for step in range(cfg.max_new_tokens):
            nxt = self._select(logits, cfg, gen)
            row = []
            for b in range(B):
                t = int(nxt[b])
                if done[b] or t in eos:
                    done[b] = True
                    row.append(None)
                else:
                    row.append(t)
            yield row
            if all(done) or step == cfg.max_new_tokens - 1:
                return
            pos = (lengths + step)[:, None]
            if mask is not None:
                mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=dev)], dim=1)
            # The adapter is disabled around each forward only, never across a yield: code that
            # runs between two streamed tokens (e.g. compressing more chunks) sees the encoder.
            with torch.no_grad(), self._decoder() as lm:
                out = lm(input_ids=nxt[:, None], position_ids=pos, attention_mask=mask, use_cache=True,
                         **cache_kwargs(lm, cache))
            logits = out.logits[:, -1].float()

    def _merge(self, prefills: list[Prefill]) -> tuple[Any, torch.Tensor]:
        """Left-pad several single-row caches into one batch cache plus its attention mask."""
        dev = self.base.device
        L = max(p.length for p in prefills)
        kv = []
        for layer in range(num_cache_layers(prefills[0].cache)):
            ks, vs = [], []
            for p in prefills:
                k, v = cache_layer(p.cache, layer)
                padn = L - k.shape[2]
                ks.append(torch.nn.functional.pad(k, (0, 0, padn, 0)))
                vs.append(torch.nn.functional.pad(v, (0, 0, padn, 0)))
            kv.append((torch.cat(ks), torch.cat(vs)))
        mask = torch.zeros(len(prefills), L, dtype=torch.long, device=dev)
        for b, p in enumerate(prefills):
            mask[b, L - p.length:] = 1
        return new_cache(self.base.model.config, kv), mask

    # ------------------------------------------------------------------ public API
    def stream(self, segments: Sequence[Segment], config: GenerationConfig | None = None, **kwargs: Any) -> Iterator[str]:
        """Yield the answer as text pieces while it is generated (stop strings are honoured)."""
        yield from self.stream_result(segments, config, **kwargs)

    def stream_result(self, segments: Sequence[Segment], config: GenerationConfig | None = None,
                      **kwargs: Any) -> GenerationStream:
        """Like :meth:`stream`, as a :class:`GenerationStream` whose ``result`` (token ids, finish
        reason, token accounting) is set once the pieces are exhausted."""
        return GenerationStream(self, segments, _make_config(config, kwargs))

    def _stream_text(self, prefills: list[Prefill], cfg: GenerationConfig) -> Iterator[tuple[str, dict]]:
        """Single-row text streaming; yields (new text, state) pairs. State carries ids and finish reason."""
        ids: list[int] = []
        emitted = 0
        hold = max((len(s) for s in cfg.stop), default=0)
        state = {"ids": ids, "finish": "length", "text": ""}
        for row in self._token_stream(prefills, cfg):
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
                    yield text[emitted:], state
                return
            state["text"] = text
            safe = len(text) - hold if hold else len(text)
            if text.endswith("\ufffd"):
                safe = min(safe, len(text) - 1)
            if safe > emitted:
                yield text[emitted:safe], state
                emitted = safe
        text = state["text"]
        if len(text) > emitted:
            yield text[emitted:], state

    def generate(self, segments: Sequence[Segment], config: GenerationConfig | None = None, **kwargs: Any) -> GenerationResult:
        """Generate a completion for one prompt."""
        stream = self.stream_result(segments, config, **kwargs)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def generate_batch(self, prompts: Sequence[Sequence[Segment]], config: GenerationConfig | None = None,
                       **kwargs: Any) -> list[GenerationResult]:
        """Generate for several prompts at once (one batched decode loop)."""
        cfg = _make_config(config, kwargs)
        if not prompts:
            return []
        t0 = time.perf_counter()
        pres = [self.prefill(p) for p in prompts]
        ids: list[list[int]] = [[] for _ in pres]
        finish = ["length"] * len(pres)
        texts = [""] * len(pres)
        stopped = [False] * len(pres)
        ttft = None
        for row in self._token_stream(pres, cfg):
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
        for b, p in enumerate(pres):
            text = texts[b] if (stopped[b] and cfg.stop and finish[b] == "stop" and texts[b]) else \
                self.tokenizer.decode(ids[b], skip_special_tokens=True)
            cut = _find_stop(text, cfg.stop)
            if cut is not None:
                text = text[:cut]
            out.append(GenerationResult(text, ids[b], finish[b], p.length, p.text_tokens, p.compressed_tokens,
                                        p.source_tokens, ttft or total, total))
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
