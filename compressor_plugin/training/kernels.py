"""Fused GPU kernels for training and cache builds: Liger's Triton RMSNorm, rotary embedding and SwiGLU/GeGLU.

The default model is narrow (576 wide), so a training step spends more GPU time in element-wise
work (RMSNorm in fp32, rotary halves, SiLU, dtype copies) than in matrix products. Liger-Kernel
fuses each of those into one Triton kernel with the same numerics. It is optional
(``pip install 'compressor-plugin[fast]'``), CUDA only, and applied to the model instance
in a training or cache-building process only (``train --fused-kernels``, ``cache build
--fused-kernels``): the base weights and what users load are unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import CompressorPluginError

#: model_type -> Liger patch function name, and the keyword of its MLP kernel
_PATCHES = {
    "llama": ("apply_liger_kernel_to_llama", "swiglu"),
    "mistral": ("apply_liger_kernel_to_mistral", "swiglu"),
    "qwen2": ("apply_liger_kernel_to_qwen2", "swiglu"),
    "qwen3": ("apply_liger_kernel_to_qwen3", "swiglu"),
    "gemma3_text": ("apply_liger_kernel_to_gemma3_text", "geglu"),
}


class FusedKernelsError(CompressorPluginError, RuntimeError):
    """Fused kernels were asked for where they cannot run."""


#: Liger's backend registry logs one warning per optional backend for other hardware (CuTe DSL,
#: Ascend) that it cannot import; none of them is one of the CUDA kernels used here.
LIGER_REGISTRY_LOGGER = "liger_kernel.backends.registry"


def quiet_liger_registry() -> None:
    """Show only errors from Liger's backend registry, unless its logger's level was set already."""
    registry = logging.getLogger(LIGER_REGISTRY_LOGGER)
    if registry.level == logging.NOTSET:
        registry.setLevel(logging.ERROR)


def fused_kernel_families() -> tuple[str, ...]:
    """Model families that :func:`apply_fused_kernels` patches."""
    return tuple(_PATCHES)


def apply_fused_kernels(model: Any) -> str:
    """Swap the RMSNorm, rotary and MLP kernels of a CUDA causal LM (in place) for Liger's.

    ``model`` is the transformers ``*ForCausalLM`` (under any PEFT wrapper). The loss is left
    alone (the trainer computes its own chunked cross-entropy). Returns the model family.

    Raises:
        FusedKernelsError: not on CUDA, ``liger-kernel`` not installed, or a family it does not cover.
    """
    from ..hf_compat import causal_lm

    lm = causal_lm(model)
    family = getattr(lm.config, "model_type", None)
    device = next(lm.parameters()).device
    if device.type != "cuda":
        raise FusedKernelsError(f"fused kernels run on CUDA only; the model is on {device}")
    if family not in _PATCHES:
        raise FusedKernelsError(f"no fused kernels for model family {family!r}; "
                                f"supported: {', '.join(_PATCHES)}")
    quiet_liger_registry()
    try:
        from liger_kernel.transformers import monkey_patch
    except ImportError as exc:
        raise FusedKernelsError("fused kernels need liger-kernel: pip install 'compressor-plugin[fast]'") from exc
    name, mlp = _PATCHES[family]
    getattr(monkey_patch, name)(model=lm, rope=True, rms_norm=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, **{mlp: True})
    return family
