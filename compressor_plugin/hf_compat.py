"""Small shims over Hugging Face transformers API differences (5.0 ... 5.2x)."""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

import torch


@lru_cache(maxsize=None)
def _cache_kwarg_for(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{"cache": cache}`` on transformers versions that renamed the argument, else ``past_key_values``."""
    return {_cache_kwarg_for(type(model)): cache}


def new_cache(config: Any, kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
    """A DynamicCache, optionally pre-filled with ``[(keys, values)]`` per layer (``(B, H, T, D)``).

    Every layer keeps all its entries, sliding-window layers included (``config`` is not used to
    make trimming layers): compressed chunks sit first in the cache, out of position order, and
    the encoder reads its memory tokens' keys back by index, so no entry may be dropped. The
    model's masks still apply each layer's window.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    if kv:
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
    return cache


def cache_layer(cache: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of layer ``i`` of a DynamicCache."""
    if hasattr(cache, "layers"):
        layer = cache.layers[i]
        return layer.keys, layer.values
    return cache.key_cache[i], cache.value_cache[i]  # pragma: no cover - older transformers


def num_cache_layers(cache: Any) -> int:
    return len(cache.layers) if hasattr(cache, "layers") else len(cache.key_cache)


def inner_model(model: Any) -> Any:
    """The transformer stack (no LM head) of a causal LM, through a peft wrapper if present."""
    base = model
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    if hasattr(base, "get_decoder"):
        dec = base.get_decoder()
        if dec is not None:
            return dec
    return base.model


def causal_lm(model: Any) -> Any:
    """The causal LM module under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
