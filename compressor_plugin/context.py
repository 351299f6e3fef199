"""CompressedContext: the compressed form of one text chunk.

In ``kv`` mode (500xCompressor) a context holds, for every layer of the base model, the keys
and values of k compressed tokens. Keys are stored *position-free*: the rotary rotation of
the positions they were computed at is undone, and :meth:`CompressedContext.keys_at` rotates
them to wherever the chunk is placed in a prompt. Because rotary embeddings are rotations,
a chunk placed at position p gets exactly the keys it would have had if computed there.

In ``embedding`` mode (the ICAE baseline) a context holds k vectors that the decoder reads as
input embeddings.

Either mode may also carry *anchors* (:mod:`compressor_plugin.anchors`): ``anchor_ids``, token
ids of the chunk's salient exact spans that the decoder reads as ordinary text right after the
k slots. Anchor tokens are prompt tokens: :attr:`CompressedContext.positions` counts them.

Contexts serialise to safetensors bytes (never pickle) with a sha256 digest of the tensor
data, so truncated or corrupted bytes fail loudly in :meth:`CompressedContext.from_bytes`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from . import store_format
from .anchors import MAX_ANCHOR_TOKENS
from .errors import ContextFormatError  # noqa: F401  (kept importable from here)

FORMAT_VERSION = store_format.CONTEXT_FORMAT_VERSION
MODES = ("kv", "embedding")
#: dtypes accepted for ``anchor_ids`` (serialised as int64).
ANCHOR_DTYPES = (torch.int64, torch.int32)



@dataclass
class CompressedContext:
    """Compressed representation of one text chunk.

    Attributes:
        mode: ``"kv"`` or ``"embedding"``.
        keys: ``(layers, kv_heads, k, head_dim)`` position-free keys (``kv`` mode).
        values: ``(layers, kv_heads, k, head_dim)`` values (``kv`` mode).
        embeddings: ``(k, hidden)`` input embeddings (``embedding`` mode).
        anchor_ids: optional 1-D integer tensor of token ids read as text right after the k
            slots (:mod:`compressor_plugin.anchors`); ``None``: no anchors.
        source_tokens: number of tokens of the text it was made from.
        base_fingerprint: :func:`compressor_plugin.models.model_fingerprint` of the base model.
        compressor_fingerprint: identity of the compressor that made it (``"identity"`` for
            the exact K/V of the text, made without a compressor).
    """

    mode: str
    source_tokens: int
    base_fingerprint: str
    compressor_fingerprint: str
    keys: torch.Tensor | None = field(default=None, repr=False)
    values: torch.Tensor | None = field(default=None, repr=False)
    embeddings: torch.Tensor | None = field(default=None, repr=False)
    extra: dict[str, str] = field(default_factory=dict)
    anchor_ids: torch.Tensor | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        anchors = f", anchors={self.anchor_count}" if self.anchor_ids is not None else ""
        return (f"CompressedContext(mode={self.mode!r}, k={self.k}{anchors}, source_tokens={self.source_tokens}, "
                f"dtype={self.dtype}, base={self.base_fingerprint}, compressor={self.compressor_fingerprint})")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.mode == "kv":
            if self.keys is None or self.values is None:
                raise ValueError("a kv context needs keys and values")
            if self.keys.dim() != 4 or self.keys.shape != self.values.shape:
                raise ValueError(
                    f"keys and values must both be (layers, kv_heads, k, head_dim); got "
                    f"{tuple(self.keys.shape)} and {tuple(self.values.shape)}")
        else:
            if self.embeddings is None or self.embeddings.dim() != 2:
                raise ValueError("an embedding context needs embeddings of shape (k, hidden)")
        if self.anchor_ids is not None:
            a = self.anchor_ids
            if not isinstance(a, torch.Tensor) or a.dim() != 1 or a.dtype not in ANCHOR_DTYPES:
                raise ValueError("anchor_ids must be a 1-D tensor of int64 or int32 token ids")
            if a.numel() > MAX_ANCHOR_TOKENS:
                raise ValueError(f"{a.numel()} anchor ids; at most {MAX_ANCHOR_TOKENS} are allowed")
            # a list, not a torch reduction: on a many-core host a reduction wakes torch's thread pool
            # for a few dozen ids, for every context made (a cache build makes thousands per second)
            if a.numel() and min(a.tolist()) < 0:
                raise ValueError("anchor ids must be >= 0")

    # ------------------------------------------------------------------ properties
    @property
    def k(self) -> int:
        """Number of compressed tokens."""
        return int(self.keys.shape[2] if self.mode == "kv" else self.embeddings.shape[0])

    @property
    def anchor_count(self) -> int:
        """Number of anchor tokens (0 without anchors)."""
        return 0 if self.anchor_ids is None else int(self.anchor_ids.numel())

    @property
    def positions(self) -> int:
        """Prompt positions the context takes: its k slots plus its anchor tokens."""
        return self.k + self.anchor_count

    def anchor_list(self) -> list[int]:
        """The anchor token ids as a list (empty without anchors)."""
        return [] if self.anchor_ids is None else [int(i) for i in self.anchor_ids.tolist()]

    @property
    def dtype(self) -> torch.dtype:
        return (self.keys if self.mode == "kv" else self.embeddings).dtype

    @property
    def device(self) -> torch.device:
        return (self.keys if self.mode == "kv" else self.embeddings).device

    @property
    def compression_ratio(self) -> float:
        """Source tokens per prompt position the context takes (anchor tokens included)."""
        return self.source_tokens / max(self.positions, 1)

    @property
    def nbytes(self) -> int:
        ts = [self.keys, self.values] if self.mode == "kv" else [self.embeddings]
        return sum(t.numel() * t.element_size() for t in ts)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "CompressedContext":
        """A copy on another device and/or dtype."""
        conv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        anchors = None if self.anchor_ids is None else self.anchor_ids.to(device=device)  # ids keep their dtype
        return CompressedContext(self.mode, self.source_tokens, self.base_fingerprint, self.compressor_fingerprint,
                                 conv(self.keys), conv(self.values), conv(self.embeddings), dict(self.extra), anchors)

    # ------------------------------------------------------------------ positions
    def keys_at(self, start: int, rotary: "RotaryHelper") -> torch.Tensor:
        """Keys rotated to positions ``start .. start+k-1``: ``(layers, kv_heads, k, head_dim)``."""
        if self.mode != "kv":
            raise ValueError("only kv contexts have keys")
        positions = torch.arange(start, start + self.k, device=self.keys.device)
        return rotary.rotate(self.keys, positions)

    # ------------------------------------------------------------------ bytes
    def _tensors(self) -> dict[str, torch.Tensor]:
        if self.mode == "kv":
            out = {"keys": self.keys.detach().contiguous().cpu(), "values": self.values.detach().contiguous().cpu()}
        else:
            out = {"embeddings": self.embeddings.detach().contiguous().cpu()}
        if self.anchor_ids is not None:
            out["anchor_ids"] = self.anchor_ids.detach().to("cpu", torch.int64).contiguous()
        return out

    @staticmethod
    def _raw(tensors: dict[str, torch.Tensor]) -> dict[str, store_format.RawTensor]:
        """CPU tensors (from :meth:`_tensors`) as raw buffers, without a copy."""
        return {name: store_format.RawTensor(str(t.dtype), tuple(t.shape),
                                             t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
                for name, t in tensors.items()}

    @classmethod
    def _digest(cls, tensors: dict[str, torch.Tensor]) -> str:
        return store_format.tensor_digest(cls._raw(tensors))

    def to_bytes(self, *, tensor_digest: str | None = None) -> bytes:
        """Serialise to safetensors bytes with metadata and a digest of the tensor data.

        ``tensor_digest``: that digest, where the caller has just computed it from this context's
        tensors (the store does, for its entry digest), so the data is hashed once. A wrong one
        makes bytes that :meth:`from_bytes` refuses.
        """
        return store_format.context_bytes(
            self._raw(self._tensors()), mode=self.mode, k=self.k, source_tokens=self.source_tokens,
            base_fingerprint=self.base_fingerprint, compressor_fingerprint=self.compressor_fingerprint,
            extra=self.extra, digest=tensor_digest)

    @classmethod
    def from_bytes(cls, data: bytes, *, device: torch.device | str | None = None) -> "CompressedContext":
        """Parse bytes written by :meth:`to_bytes`.

        Raises:
            ContextFormatError: not bytes, not safetensors, wrong format or version, shapes that
                disagree with the metadata, or a digest mismatch (corrupted tensor data).
        """
        from safetensors import safe_open  # noqa: F401  (ensures the package is present)
        from safetensors.torch import load

        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ContextFormatError(f"expected bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) < 8:
            raise ContextFormatError(f"{len(data)} bytes is too short to be a serialised context")
        header_len = int.from_bytes(data[:8], "little")
        if header_len <= 0 or 8 + header_len > len(data):
            raise ContextFormatError("truncated or invalid safetensors header")
        try:
            header = json.loads(data[8:8 + header_len])
            tensors = load(data)
        except Exception as exc:  # safetensors raises several error types
            raise ContextFormatError(f"not valid safetensors data: {exc}") from exc
        meta = header.get("__metadata__") or {}
        if meta.get("format") != store_format.CONTEXT_FORMAT:
            raise ContextFormatError("safetensors data is not a CompressedContext")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise ContextFormatError(f"unsupported format version {meta.get('format_version')!r}; "
                                     f"this version reads {FORMAT_VERSION}")
        if cls._digest(tensors) != meta.get("digest"):
            raise ContextFormatError("digest mismatch: the tensor data is corrupted")
        mode = meta.get("mode")
        allowed = ({"keys", "values"} if mode == "kv" else {"embeddings"}) | {"anchor_ids"}
        if set(tensors) - allowed:
            raise ContextFormatError(f"unexpected tensors {sorted(set(tensors) - allowed)} in a {mode!r} context")
        try:
            extra = json.loads(meta.get("extra") or "{}")
        except (ValueError, RecursionError) as exc:
            raise ContextFormatError(f"extra in the metadata is not valid JSON: {exc}") from None
        if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
            raise ContextFormatError("extra in the metadata must be a JSON object of strings")
        try:
            ctx = cls(mode=mode, source_tokens=int(meta["source_tokens"]),
                      base_fingerprint=meta["base_fingerprint"], compressor_fingerprint=meta["compressor_fingerprint"],
                      keys=tensors.get("keys"), values=tensors.get("values"), embeddings=tensors.get("embeddings"),
                      extra=extra, anchor_ids=tensors.get("anchor_ids"))
        except (KeyError, ValueError, TypeError) as exc:
            raise ContextFormatError(f"inconsistent context metadata: {exc}") from exc
        if ctx.k != int(meta.get("k", -1)):
            raise ContextFormatError("k in metadata disagrees with the tensor shapes")
        return ctx.to(device) if device is not None else ctx


def contexts_to(contexts: Sequence[CompressedContext], device: torch.device | str) -> list[CompressedContext]:
    """``[ctx.to(device) for ctx in contexts]``, with one host-to-device copy per dtype instead of one per tensor.

    From the CPU to a CUDA device, the tensors of every context that is not there yet are
    packed into one pinned host buffer per dtype and copied in one transfer; the returned
    contexts' tensors are views of that device buffer. Other moves are made context by context.
    """
    device = torch.device(device)
    moving = [i for i, ctx in enumerate(contexts) if ctx.device != device]
    out = list(contexts)
    if device.type != "cuda" or len(moving) < 2 or any(contexts[i].device.type != "cpu" for i in moving):
        for i in moving:
            out[i] = contexts[i].to(device)
        return out
    names = ("keys", "values", "embeddings", "anchor_ids")
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for i in moving:
        for name in names:
            t = getattr(contexts[i], name)
            if t is not None:
                groups.setdefault(t.dtype, []).append(t)
    moved: dict[int, torch.Tensor] = {}  # id(host tensor) -> its device view
    for dtype, tensors in groups.items():
        host = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, pin_memory=True)
        torch.cat([t.reshape(-1) for t in tensors], out=host)
        flat = host.to(device, non_blocking=True)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            moved[id(t)] = part.view(t.shape)
    for i in moving:
        ctx = contexts[i]
        get = lambda t: None if t is None else moved[id(t)]  # noqa: E731
        out[i] = CompressedContext(ctx.mode, ctx.source_tokens, ctx.base_fingerprint, ctx.compressor_fingerprint,
                                   get(ctx.keys), get(ctx.values), get(ctx.embeddings), dict(ctx.extra),
                                   get(ctx.anchor_ids))
    return out


class RotaryHelper:
    """Applies and undoes a model's rotary position embedding on cached keys.

    Uses the model's own rotary module for cos/sin, so scaled variants (Llama 3, linear,
    dynamic NTK at fixed length) get the frequencies the model itself uses.

    Families whose layers use different rotary bases (Gemma 3: ``rope_local_base_freq`` on its
    sliding-window layers, ``rope_theta`` on its global layers) are rotated layer by layer: the
    keys passed to :meth:`rotate` and :meth:`unrotate` must then have the layer axis at
    position ``-4`` (``(..., layers, kv_heads, T, head_dim)``), which is the layout of every
    key tensor in this package.
    """

    def __init__(self, model: Any):
        self.rotary = find_rotary_module(model)
        config = model.config
        self.config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.layer_types: list[str] | None = None
        self._type_layers: dict[str, list[int]] = {}
        if _takes_layer_type(self.rotary):
            types = list(getattr(self.config, "layer_types", None) or [])
            if len(types) != self.config.num_hidden_layers:
                raise ValueError("the rotary module is per layer type, but the config has no layer_types")
            self.layer_types = types
            for i, t in enumerate(types):
                self._type_layers.setdefault(t, []).append(i)

    @property
    def per_layer(self) -> bool:
        """True when layers of one model use different rotary frequencies."""
        return self.layer_types is not None and len(self._type_layers) > 1

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype, device: torch.device,
                layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape ``(..., head_dim)`` for integer positions of any shape.

        ``layer_type`` picks the frequencies of one kind of layer (``"sliding_attention"``,
        ``"full_attention"``) on models whose rotary module has several; default: the first
        layer's kind.
        """
        flat = positions.reshape(1, -1).to(device)
        probe = torch.zeros(1, device=device, dtype=torch.float32)
        if self.layer_types is not None:
            layer_type = layer_type or self.layer_types[0]
            cos, sin = self.rotary(probe, flat, layer_type)
            scale = getattr(self.rotary, f"{layer_type}_attention_scaling", 1.0)
        else:
            cos, sin = self.rotary(probe, flat)
            scale = getattr(self.rotary, "attention_scaling", 1.0)
        scale = float(scale or 1.0)
        shape = tuple(positions.shape) + (cos.shape[-1],)
        cos, sin = cos.reshape(shape) / scale, sin.reshape(shape) / scale
        return cos.to(dtype), sin.to(dtype)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def _apply(self, keys: torch.Tensor, positions: torch.Tensor, sign: float) -> torch.Tensor:
        k = keys.float()
        if not self.per_layer:
            cos, sin = self.cos_sin(positions, torch.float32, keys.device)
            return (k * cos + sign * self._rotate_half(k) * sin).to(keys.dtype)
        if keys.dim() < 4 or keys.shape[-4] != len(self.layer_types):
            raise ValueError(
                f"this model rotates each layer with its own frequencies; keys need the layer axis at -4 "
                f"with {len(self.layer_types)} layers, got shape {tuple(keys.shape)}")
        dim = k.dim() - 4
        out = torch.zeros_like(k)
        for layer_type, layers in self._type_layers.items():
            idx = torch.tensor(layers, device=k.device)
            part = k.index_select(dim, idx)
            cos, sin = self.cos_sin(positions, torch.float32, keys.device, layer_type)
            out = out.index_copy(dim, idx, part * cos + sign * self._rotate_half(part) * sin)
        return out.to(keys.dtype)

    def rotate(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate position-free keys ``(..., T, head_dim)`` to ``positions`` (``(T,)`` or broadcastable ``(..., T)``)."""
        return self._apply(keys, positions, 1.0)

    def unrotate(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Undo the rotation of keys computed at ``positions``."""
        return self._apply(keys, positions, -1.0)


def _takes_layer_type(rotary: Any) -> bool:
    """Whether a rotary module's forward takes a ``layer_type`` (one set of frequencies per kind of layer)."""
    import inspect

    try:
        return "layer_type" in inspect.signature(rotary.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def find_rotary_module(model: Any) -> Any:
    """The rotary embedding module of a (possibly peft-wrapped) Hugging Face causal LM."""
    for name, module in model.named_modules():
        if name.endswith("rotary_emb") and "layers." not in name:
            return module
    for name, module in model.named_modules():
        if name.endswith("rotary_emb"):
            return module
    raise ValueError("the model has no rotary embedding module (rotary_emb); only rotary causal LMs are supported")
