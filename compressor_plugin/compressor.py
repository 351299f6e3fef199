"""The compressor: text chunk -> k compressed tokens (500xCompressor and the ICAE baseline).

One copy of the base weights serves both roles:

* encoder = base model + a LoRA adapter, reading ``[text tokens][k memory embeddings]``;
* decoder = the same model with the adapter disabled, i.e. exactly the user's model.

In ``kv`` mode the compressed form is the keys and values of the k memory positions at every
layer (stored position-free, see :mod:`compressor_plugin.context`). In ``embedding`` mode it
is the last hidden states of the memory positions, which the decoder reads as input embeddings.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import stat
import threading
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .context import CompressedContext, RotaryHelper
from .errors import (CheckpointMismatchError, CheckpointNotFoundError, CompressorError, ContextTooLongError,
                     InvalidOptionError, ModelNotAvailableError)
from .hf_compat import cache_kwargs, inner_model
from .models import DEFAULT_MODEL, GGUF_MODELS, BaseModel, bos_prefix, load_base_model, with_bos
from .text import literal_ids, lone_surrogate, surrogate_message

CHECKPOINT_FORMAT = "compressor_plugin.checkpoint/1"
CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
#: The largest ``config.json`` a checkpoint may have (a real one is under 1 KB).
MAX_CONFIG_BYTES = 1 << 20
#: Largest ``CompressorConfig.max_length`` accepted (tokens per compressed chunk), whatever the
#: model: it bounds one encoder forward, and a checkpoint's config.json is read from disk.
MAX_LENGTH_LIMIT = 32768
#: Largest ``CompressorConfig.lora_alpha`` accepted: the LoRA update is scaled by alpha / r, and a
#: checkpoint's config.json is read from disk (real ones use 8-512; 1e30 gave finite garbage).
MAX_LORA_ALPHA = 65536
#: safetensors dtypes a checkpoint's tensors may have.
_CHECKPOINT_DTYPES = {"F32", "F16", "BF16", "F64"}


def _raise_recompile_limit(at_least: int) -> dict[str, int]:
    """Raise dynamo's per-code recompile limit to ``at_least``; returns the old values."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # the older name (an alias on newer torch)
        value = getattr(dynamo_config, name, None)
        if isinstance(value, int):
            setattr(dynamo_config, name, max(value, at_least))
            return {name: value}
    return {}


def _restore_recompile_limit(old: dict[str, int]) -> None:
    import torch._dynamo.config as dynamo_config

    for name, value in old.items():
        setattr(dynamo_config, name, value)


@dataclass
class CompressorConfig:
    """Hyper-parameters that define a compressor (saved with every checkpoint)."""

    k: int = 16
    mode: str = "kv"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    max_length: int = 512
    base_model: str = ""
    base_fingerprint: str = ""

    def __post_init__(self) -> None:
        # every field is checked for type and range: a checkpoint's config.json is read from disk
        if self.mode not in ("kv", "embedding"):
            raise ValueError(f"mode must be 'kv' or 'embedding', not {self.mode!r}")
        if not _is_int(self.k) or not 1 <= self.k <= 512:
            raise ValueError(f"k must be an integer between 1 and 512, not {self.k!r}")
        if not _is_int(self.max_length) or not 1 <= self.max_length <= MAX_LENGTH_LIMIT:
            raise ValueError(f"max_length must be an integer between 1 and {MAX_LENGTH_LIMIT}, not {self.max_length!r}")
        if not _is_int(self.lora_r) or self.lora_r < 1:
            raise ValueError(f"lora_r must be a positive integer, not {self.lora_r!r}")
        if not _is_number(self.lora_alpha) or not 0 < self.lora_alpha <= MAX_LORA_ALPHA:
            raise ValueError(f"lora_alpha must be a number in (0, {MAX_LORA_ALPHA}], not {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be a number in [0, 1), not {self.lora_dropout!r}")
        if (not isinstance(self.target_modules, (list, tuple)) or not self.target_modules
                or not all(isinstance(m, str) and m for m in self.target_modules)):
            raise ValueError(f"target_modules must be a non-empty list of module names, not {self.target_modules!r}")
        for name in ("base_model", "base_fingerprint"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, not {getattr(self, name)!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_rank_fits(config: CompressorConfig, base: BaseModel) -> None:
    """Raise ValueError when ``config.lora_r`` exceeds the base model's hidden size.

    A larger rank adds nothing a rank of the hidden size cannot express, and a rank read from
    a checkpoint's config would otherwise decide how much memory the LoRA matrices take.
    """
    cfg = base.model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden = int(getattr(text_cfg, "hidden_size", 0) or 0)
    if hidden and config.lora_r > hidden:
        raise ValueError(f"lora_r={config.lora_r} is larger than the base model's hidden size ({hidden})")


def check_length_fits(config: CompressorConfig, base: BaseModel) -> None:
    """Raise ValueError when a chunk of ``config.max_length`` tokens and its k memory slots (and
    the BOS the tokenizer adds, if any) take more positions than the base model has
    (``max_position_embeddings``, when its config declares one).

    ``max_length`` decides how long a text is compressed in one encoder forward (documents are
    split into chunks of at most that many tokens); positions past the model's are not trained.
    """
    cfg = base.model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    limit = getattr(text_cfg, "max_position_embeddings", None) or getattr(cfg, "max_position_embeddings", None)
    if not _is_int(limit) or limit < 1:
        return
    tokenizer = getattr(base, "tokenizer", None)
    bos = len(bos_prefix(tokenizer)) if tokenizer is not None else 0
    needed = config.max_length + config.k + bos
    if needed > limit:
        raise ValueError(
            f"max_length={config.max_length} with k={config.k}" + (" and a BOS token" if bos else "")
            + f" needs {needed} positions, more than the base model's max_position_embeddings ({limit})")


def check_targets_fit(config: CompressorConfig, base: BaseModel) -> None:
    """Raise ValueError unless every name in ``config.target_modules`` names linear layers of the base model.

    Names match as peft matches them (the module's full name, or its last dotted parts). A
    name read from a checkpoint's config that matches nothing, or a module LoRA cannot adapt
    (a whole decoder layer, the embeddings), is refused here, before the adapter is injected.
    """
    linear = [name for name, module in base.model.named_modules() if isinstance(module, nn.Linear)]
    for target in config.target_modules:
        if not any(name == target or name.endswith("." + target) for name in linear):
            raise ValueError(f"target_modules names {target!r}, which is not a linear layer of the base model")


class Compressor(nn.Module):
    """Compresses text chunks into :class:`CompressedContext` objects.

    Example:
        >>> comp = Compressor.from_pretrained("default")        # doctest: +SKIP
        >>> ctx = comp.compress(["Paris is the capital of France."])[0]  # doctest: +SKIP
        >>> ctx.k, ctx.source_tokens                             # doctest: +SKIP
        (16, 7)
    """

    def __init__(self, base: BaseModel, config: CompressorConfig | None = None, *, seed: int = 0):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        if hasattr(base.model, "peft_config") or hasattr(base.model, "get_base_model"):
            raise ValueError(
                "this base model already carries an adapter (another Compressor, or a peft model); "
                "LoRA is injected into the model in place, so a second compressor would overwrite the first. "
                "Load a fresh base model for each compressor: load_base_model()")
        self.base = base
        cfg = config or CompressorConfig()
        check_rank_fits(cfg, base)
        check_length_fits(cfg, base)
        check_targets_fit(cfg, base)
        cfg.base_model = cfg.base_model or base.name
        cfg.base_fingerprint = base.fingerprint
        self.config = cfg
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.target_modules), bias="none")
        torch.manual_seed(seed)
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
            self.peft_model = get_peft_model(base.model, lcfg)
        self.peft_model.eval()
        embed = base.model.get_input_embeddings()
        # Gemma families multiply looked-up embeddings by sqrt(hidden) inside the embedding module;
        # memory embeddings bypass it, so they start at the scale of the looked-up ones.
        emb = embed.weight.detach().float() * float(getattr(embed, "embed_scale", 1.0))
        gen = torch.Generator().manual_seed(seed)
        init = emb.mean(0, keepdim=True).cpu() + emb.std(0, keepdim=True).cpu() * torch.randn(cfg.k, emb.shape[1], generator=gen)
        self.memory = nn.Parameter(init.to(emb.device))
        self.rotary = RotaryHelper(base.model)
        self._fingerprint: str | None = None
        # The adapter on/off switch is model-wide state: encoding (adapter on) and decoding
        # (adapter off) must never overlap across threads.
        self.lock = threading.RLock()

    # ------------------------------------------------------------------ identity
    @property
    def tokenizer(self) -> Any:
        return self.base.tokenizer

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def device(self) -> torch.device:
        return self.memory.device

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter weights and memory embeddings: everything a checkpoint holds."""
        from peft import get_peft_model_state_dict

        sd = {f"adapter.{k}": v for k, v in get_peft_model_state_dict(self.peft_model).items()}
        sd["memory"] = self.memory.detach()
        return sd

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters training updates (LoRA matrices and memory embeddings)."""
        params = [p for n, p in self.peft_model.named_parameters() if "lora_" in n]
        return params + [self.memory]

    def mark_trainable(self) -> None:
        for n, p in self.peft_model.named_parameters():
            p.requires_grad_("lora_" in n)
        self.memory.requires_grad_(True)

    @property
    def fingerprint(self) -> str:
        """sha256 (16 hex) of the config and trainable weights; part of every store key."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode())
            for name, t in sorted(self.trainable_state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def invalidate_fingerprint(self) -> None:
        """Call after changing weights (training does) so the next store key is new."""
        self._fingerprint = None

    @contextlib.contextmanager
    def decoder(self) -> Iterator[Any]:
        """Context in which the model is exactly the base model (adapter disabled).

        Entered around every decoder forward (once per generated token), so the switch is
        cheap: it flips the disable flag of each LoRA layer (found once) instead of going
        through ``PeftModel.disable_adapter``, which inspects the whole model on every entry
        (about 30 ms for the default model on a CPU).
        """
        with self.lock:
            layers = self._adapter_layers()
            if layers is None:  # adapter types other than plain tuner layers: peft's own switch
                with self.peft_model.disable_adapter():
                    yield causal_lm_of(self.peft_model)
                return
            before = [layer._disable_adapters for layer in layers]
            was = getattr(self.peft_model, "_adapters_disabled", False)
            try:
                for layer in layers:
                    layer._disable_adapters = True
                self.peft_model._adapters_disabled = True
                yield causal_lm_of(self.peft_model)
            finally:
                for layer, flag in zip(layers, before):
                    layer._disable_adapters = flag
                self.peft_model._adapters_disabled = was

    def _adapter_layers(self) -> list[Any] | None:
        """The model's LoRA layers (cached), or None when the cheap adapter switch does not apply."""
        if getattr(self, "_lora_layers", None) is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            try:
                from peft.utils import ModulesToSaveWrapper
            except ImportError:  # pragma: no cover - older peft
                ModulesToSaveWrapper = ()  # noqa: N806
            layers, other = [], False
            for mod in self.peft_model.modules():
                if isinstance(mod, BaseTunerLayer):
                    layers.append(mod)
                elif ModulesToSaveWrapper and isinstance(mod, ModulesToSaveWrapper):
                    other = True
            ok = not other and all(hasattr(m, "_disable_adapters") for m in layers)
            self._lora_layers = layers if ok else []
            self._lora_switch = ok
        return self._lora_layers if self._lora_switch else None

    @contextlib.contextmanager
    def fast_encoder(self, *, merge: bool = True, compile: bool = False) -> Iterator[None]:
        """Context for long compression jobs (offline cache building): a faster encoder.

        ``merge`` folds the LoRA weights into the base projections, so each adapted layer runs
        one matrix product instead of three plus an add; the exact base weights are saved
        first and copied back on exit (no rounding drift, even in bf16). ``compile`` wraps
        every transformer block in ``torch.compile`` (one compiled block serves all layers;
        the first batches pay the compilation). Outputs match the plain encoder up to
        floating-point rounding.

        The compressor's lock is held throughout: while merged the model is not the base
        model, so no decoding can run in another thread until the context exits.
        """
        from peft.tuners.lora import LoraLayer

        with self.lock:
            _ = self.fingerprint, self.base.fingerprint  # computed from the unmerged weights
            saved: list[tuple[torch.Tensor, torch.Tensor]] = []
            compiled: list[nn.Module] = []
            limits: dict[str, int] = {}
            try:
                if merge:
                    for mod in self.peft_model.modules():
                        if isinstance(mod, LoraLayer):
                            w = mod.get_base_layer().weight
                            saved.append((w, w.detach().clone()))
                    self.peft_model.merge_adapter()
                if compile:
                    blocks = list(inner_model(self.peft_model).layers)
                    # every block's attributes (its layer index) differ, so each is one more
                    # compiled variant of the same code: allow one per block, or dynamo stops
                    # compiling after the eighth and the rest run uncompiled
                    limits = _raise_recompile_limit(len(blocks) + 8)
                    for block in blocks:
                        block.compile()
                        compiled.append(block)
                yield
            finally:
                for block in compiled:
                    block._compiled_call_impl = None  # back to the plain forward
                _restore_recompile_limit(limits)
                if saved:
                    for mod in self.peft_model.modules():
                        if isinstance(mod, LoraLayer):
                            mod.merged_adapters = []
                    with torch.no_grad():
                        for w, orig in saved:
                            w.copy_(orig)

    # ------------------------------------------------------------------ tokenisation
    def tokenize(self, texts: Sequence[str], *, truncate: bool = False) -> list[list[int]]:
        """Token ids of each text (no special tokens), validated.

        Raises:
            CompressorError: a text is not a string, is empty / whitespace only, or holds a lone
                surrogate (not valid Unicode; the message names the text and the character).
            ContextTooLongError: a text is longer than ``config.max_length`` tokens and
                ``truncate`` is False. With ``truncate=True`` it keeps the first tokens.
        """
        return self._token_ids(texts, truncate=truncate)[0]

    def _token_ids(self, texts: Sequence[str], *, truncate: bool) -> tuple[list[list[int]], list[bool]]:
        """Validated token ids and, per text, whether it was cut to ``max_length``."""
        if isinstance(texts, str):
            raise CompressorError("pass a list of texts, not a single string")
        out: list[list[int]] = []
        cut: list[bool] = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise CompressorError(f"text {i} is {type(t).__name__}, not str")
            if not t.strip():
                raise CompressorError(f"text {i} is empty; there is nothing to compress")
            bad = lone_surrogate(t)
            if bad is not None:
                raise CompressorError(surrogate_message(t, bad, f"text {i}"))
            ids = literal_ids(self.tokenizer, t)  # "<|im_end|>" in a chunk is text, not a control token
            too_long = len(ids) > self.config.max_length
            if too_long:
                if not truncate:
                    raise ContextTooLongError(
                        f"text {i} has {len(ids)} tokens, more than max_length={self.config.max_length}; "
                        "split it into chunks first, or pass truncate=True to keep the first tokens")
                ids = ids[: self.config.max_length]
            out.append(ids)
            cut.append(too_long)
        return out, cut

    # ------------------------------------------------------------------ encoding
    def encode_ids(self, batch: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Run the encoder on a batch of token-id lists (differentiable).

        Layout per row: ``[bos][text][memory x k][padding]`` (``bos`` only for tokenizers that add
        one, see :func:`~compressor_plugin.models.bos_prefix`): right padding after the memory tokens,
        so memory tokens never attend to padding and no query row is fully masked.

        Returns:
            kv mode: ``keys`` and ``values`` of shape ``(B, layers, kv_heads, k, head_dim)``,
            keys position-free. embedding mode: ``embeddings`` ``(B, k, hidden)``.
        """
        dev = self.device
        model = self.peft_model
        lm = causal_lm_of(model)
        k = self.config.k
        batch = [with_bos(self.tokenizer, row) for row in batch]  # models that need a BOS (Gemma) get it
        T = max(len(x) for x in batch)  # from the host: reading it back from the device would wait for it
        lengths = torch.tensor([len(x) for x in batch]).to(dev, non_blocking=True)
        pad = self.tokenizer.pad_token_id or 0
        ids_cpu = torch.full((len(batch), T), pad, dtype=torch.long)
        for i, row in enumerate(batch):
            ids_cpu[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        ids = ids_cpu.to(dev, non_blocking=True)
        embed = lm.get_input_embeddings()
        tok_emb = embed(ids)
        mem = self.memory.to(tok_emb.dtype)
        B, H = len(batch), tok_emb.shape[-1]
        # Insert the memory embeddings right after each row's text.
        full = torch.cat([tok_emb, torch.zeros(B, k, H, dtype=tok_emb.dtype, device=dev)], dim=1)
        mem_pos = lengths[:, None] + torch.arange(k, device=dev)[None, :]  # (B, k)
        is_mem = torch.zeros(B, T + k, dtype=torch.bool, device=dev)
        is_mem.scatter_(1, mem_pos, True)
        mem_full = torch.zeros_like(full)
        mem_full = mem_full.index_put((torch.arange(B, device=dev)[:, None].expand(B, k), mem_pos), mem.expand(B, k, H))
        # Text after the memory slots belongs to padding in this layout; shift the text tokens that
        # lie at memory positions (they are padding anyway, since text ends at lengths[i]).
        inputs = torch.where(is_mem[..., None], mem_full, full)
        # No padding mask (attention_mask=None below): padding only ever follows a row's text and
        # memory tokens, so the causal mask alone keeps it out of every position we read, and SDPA
        # can take its fused causal (flash) kernel instead of materialising a (B, 1, T, T) mask.
        pos = torch.arange(T + k, device=dev)[None, :].expand(B, -1)
        body = inner_model(model)
        if self.config.mode == "embedding":
            out = body(inputs_embeds=inputs, attention_mask=None, position_ids=pos, use_cache=False)
            h = out.last_hidden_state
            idx = mem_pos[..., None].expand(B, k, h.shape[-1])
            return {"embeddings": torch.gather(h, 1, idx)}
        # Keep only the memory positions' K/V: each layer's keys and values are gathered as the
        # forward computes them, instead of caching every position and gathering at the end.
        kept = memory_slot_cache(lm.config, mem_pos)
        body(inputs_embeds=inputs, attention_mask=None, position_ids=pos, use_cache=True, **cache_kwargs(body, kept))
        K = torch.stack([k for k, _ in kept.kept], dim=1)  # (B, L, H, k, D)
        V = torch.stack([v for _, v in kept.kept], dim=1)
        K = self.rotary.unrotate(K, mem_pos[:, None, None, :])
        return {"keys": K, "values": V}

    @torch.no_grad()
    def encode_contexts(self, ids: Sequence[Sequence[int]], *, host: bool = False,
                        truncated: Sequence[bool] | None = None, anchors: int = 0,
                        anchor_ids: Sequence[Sequence[int]] | None = None) -> list[CompressedContext]:
        """Compress a batch of token-id lists with one encoder forward (the one encode path).

        :meth:`compress` (the store's compute-on-miss path) and offline cache building
        (:func:`compressor_plugin.caching.build.encode_contexts`) both make their contexts here.

        Args:
            ids: token ids per chunk (at most ``config.max_length`` each).
            host: put the contexts on the CPU with one device-to-host copy for the whole batch
                (cache building); otherwise they stay on the compressor's device.
            truncated: per chunk, whether its text was cut to ``max_length`` (recorded in ``extra``).
            anchors: anchor token budget per chunk (:mod:`compressor_plugin.anchors`): each
                context also gets the ids of its chunk's salient exact spans (chosen from the
                text of ``ids``, so a truncated chunk anchors what was compressed), and the
                compressor fingerprint it records is
                :func:`~compressor_plugin.anchors.anchored_fingerprint`. 0: no anchors.
            anchor_ids: the anchors of each chunk when the caller chose them already
                (:func:`~compressor_plugin.anchors.anchors_for_ids` with this compressor's
                tokenizer and ``anchors``; ``cache build`` does so in worker processes).
        """
        from .anchors import anchors_for_ids, attach_anchors, check_budget

        check_budget(anchors)
        if not ids:
            return []
        if anchor_ids is not None and len(anchor_ids) != len(ids):
            raise ValueError(f"anchor_ids has {len(anchor_ids)} rows for {len(ids)} chunks")
        fp, base_fp = self.fingerprint, self.base.fingerprint
        out = self.encode_ids([list(r) for r in ids])
        if anchors and anchor_ids is None:  # on the host while a GPU still runs the encoder (its launches are async)
            anchor_ids = anchors_for_ids(ids, self.tokenizer, anchors)
        if host:
            out = {name: to_host(t) for name, t in out.items()}
        flags = list(truncated) if truncated is not None else [False] * len(ids)
        made = []
        for j, row in enumerate(ids):
            extra = {"truncated": "true"} if flags[j] else {}
            # on the device, each context gets its own storage (a view would keep the whole batch alive)
            take = (lambda t: t[j]) if host else (lambda t: t[j].clone())
            if self.mode == "kv":
                ctx = CompressedContext("kv", len(row), base_fp, fp, keys=take(out["keys"]),
                                        values=take(out["values"]), extra=extra)
            else:
                ctx = CompressedContext("embedding", len(row), base_fp, fp, embeddings=take(out["embeddings"]),
                                        extra=extra)
            made.append(attach_anchors(ctx, anchor_ids[j], anchors) if anchors else ctx)
        return made

    @torch.no_grad()
    def compress(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 16,
        truncate: bool = False,
        progress: bool = False,
        anchors: int = 0,
    ) -> list[CompressedContext]:
        """Compress texts into contexts (in input order).

        Texts are sorted by length and batched, so little time goes into padding.

        Args:
            texts: non-empty strings of at most ``config.max_length`` tokens each.
            batch_size: texts per encoder forward.
            truncate: keep the first ``max_length`` tokens of longer texts instead of raising.
            progress: show a tqdm progress bar.
            anchors: anchor token budget per chunk (see :meth:`encode_contexts`); 0: none.
        """
        from .anchors import check_budget

        check_budget(anchors)
        ids, cut = self._token_ids(texts, truncate=truncate)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        results: list[CompressedContext | None] = [None] * len(ids)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc=f"compress k={self.k}", unit="chunk")
        was_training = self.peft_model.training
        self.lock.acquire()
        self.peft_model.eval()
        try:
            for s in range(0, len(order), batch_size):
                chunk = order[s: s + batch_size]
                made = self.encode_contexts([ids[i] for i in chunk], truncated=[cut[i] for i in chunk],
                                            anchors=anchors)
                for i, ctx in zip(chunk, made):
                    results[i] = ctx
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
            self.peft_model.train(was_training)
            self.lock.release()
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                        extra: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` and ``weights.safetensors`` (adapter + memory) to ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {n: t.detach().to("cpu", dtype).contiguous() for n, t in self.trainable_state_dict().items()}
        self.invalidate_fingerprint()
        meta = {"format": CHECKPOINT_FORMAT, "config": asdict(self.config), "fingerprint": self.fingerprint,
                **({"info": extra} if extra else {})}
        save_file(tensors, str(path / "weights.safetensors"), metadata={"format": CHECKPOINT_FORMAT})
        (path / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return path

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load adapter and memory weights saved by :meth:`save_pretrained` into this compressor.

        The file must hold exactly this compressor's tensors, each of its shape, floating point
        and finite; everything is checked from the safetensors header before any tensor is read.

        Raises:
            CheckpointMismatchError: naming the file and what is wrong with it.
        """
        from peft import set_peft_model_state_dict

        file = Path(path) / "weights.safetensors"
        tensors = read_checked_tensors(file, {name: tuple(t.shape) for name, t in self.trainable_state_dict().items()})
        mem = tensors.pop("memory")
        adapter = {n[len("adapter."):]: t for n, t in tensors.items() if n.startswith("adapter.")}
        res = set_peft_model_state_dict(self.peft_model, adapter)
        unexpected = getattr(res, "unexpected_keys", [])
        if unexpected:
            raise CheckpointMismatchError(f"{file}: checkpoint has weights this compressor lacks: {unexpected[:3]}",
                                          path=file)
        with torch.no_grad():
            self.memory.copy_(mem.to(self.memory.device, self.memory.dtype))
        self.invalidate_fingerprint()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike = "default",
        *,
        base: BaseModel | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        allow_download: bool = False,
    ) -> "Compressor":
        """Load a saved compressor.

        Args:
            path: a checkpoint folder, a shipped checkpoint name (``"default"``, ``"kv-k16"``,
                ``"kv-k4"``, ``"kv-k1"``, ``"embedding-k16"``, ``"embedding-k1"``).
            base: an already loaded base model (its fingerprint must match the checkpoint's);
                by default the checkpoint's base model is loaded.
            allow_download: without ``base``, let the checkpoint's base model be downloaded from
                the Hugging Face Hub. By default it must be the default model, a local folder or
                already in the local Hugging Face cache: a checkpoint does not choose what is
                downloaded.

        Raises:
            CheckpointNotFoundError: no checkpoint there (a ``FileNotFoundError``).
            CheckpointMismatchError: the checkpoint was trained for another base model.
            ModelNotAvailableError: the checkpoint's base model is not here (and not downloaded).
            InvalidOptionError: ``dtype`` float16 (see below).
        """
        if base is None and dtype is not None and str(dtype).replace("torch.", "") in ("float16", "fp16", "half"):
            # the base-model check reads weights as bf16; fp16 rounds them first, so it never matches
            raise InvalidOptionError("dtype float16 is not supported for compressors: use bfloat16 (GPUs) or float32",
                                     option="dtype")
        folder, meta = read_checkpoint(path)
        config = checkpoint_config(folder, meta)
        if base is None:
            try:
                base = load_base_model(config.base_model or None, device=device, dtype=dtype,
                                       local_files_only=not allow_download)
            except ModelNotAvailableError as exc:
                if allow_download or (config.base_model or "default") in ("default", *GGUF_MODELS):
                    raise  # a package to install, not a download
                raise ModelNotAvailableError(
                    f"{folder / 'config.json'} names the base model {config.base_model!r}, which is not on this "
                    f"machine, and a checkpoint's base model is not downloaded unless asked. If you trust it, "
                    f"download it (hf download {config.base_model}) and load again, or pass "
                    f"base=load_base_model({config.base_model!r}) or allow_download=True", path=folder) from exc
        check_base(folder, meta, base)
        try:
            check_rank_fits(config, base)
            check_length_fits(config, base)
            check_targets_fit(config, base)
        except ValueError as exc:
            raise CheckpointMismatchError(f"{folder / 'config.json'}: {exc}", path=folder) from None
        comp = cls(base, config)
        try:
            comp.load_weights(folder)
        except BaseException:
            comp.remove_adapter()  # a refused checkpoint leaves the caller's base model as it was
            raise
        comp.to(base.device)
        return comp

    def remove_adapter(self) -> None:
        """Take this compressor's LoRA back out of its base model, which is then as it was loaded.

        The compressor is unusable afterwards; another compressor can be built on the base model.
        """
        self.peft_model.unload()

    def match_adapter_dtype(self) -> None:
        """Keep the LoRA weights in the base model's dtype, so a bf16 encoder runs in bf16 end to end.

        peft keeps adapter weights in float32 on a half-precision model (for training), which casts
        every adapted projection's input to float32 and back. Checkpoints store the weights in
        bf16, so for a bf16 model loaded from one this loses nothing and the fingerprint is
        unchanged. For inference only: :meth:`CompressionEngine.from_pretrained` calls it;
        training keeps float32 adapters.
        """
        dtype = self.base.dtype
        if dtype not in (torch.bfloat16, torch.float16):
            return
        with torch.no_grad():
            for name, p in self.peft_model.named_parameters():
                if "lora_" in name and p.dtype != dtype:
                    p.data = p.data.to(dtype)


def read_checkpoint(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Folder and ``config.json`` contents of a checkpoint (path or shipped name), format checked.

    Raises:
        CheckpointNotFoundError: no checkpoint there (a ``FileNotFoundError``).
        CheckpointMismatchError: the folder is not a compressor checkpoint.
    """
    folder = resolve_checkpoint(path)
    file = folder / "config.json"
    size = _check_regular_file(file)
    if size > MAX_CONFIG_BYTES:
        raise CheckpointMismatchError(f"{file} is too large ({size} bytes; at most {MAX_CONFIG_BYTES})", path=file)
    try:
        with open(file, "rb") as fh:
            meta = json.loads(fh.read(MAX_CONFIG_BYTES + 1).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointMismatchError(f"{file} is not valid JSON ({exc}); the checkpoint is damaged", path=file) from exc
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointMismatchError(f"{folder} is not a compressor checkpoint ({found!r})", path=folder)
    if not isinstance(meta.get("config"), dict):
        raise CheckpointMismatchError(f"{file}: 'config' is not a JSON object", path=file)
    return folder, meta


def checkpoint_config(folder: Path, meta: dict[str, Any]) -> CompressorConfig:
    """The :class:`CompressorConfig` of a checkpoint read by :func:`read_checkpoint`, every field checked.

    Raises:
        CheckpointMismatchError: an unknown field, or a field of the wrong type or range.
    """
    file = folder / "config.json"
    known = {f.name for f in fields(CompressorConfig)}
    unknown = sorted(set(meta["config"]) - known)
    if unknown:
        raise CheckpointMismatchError(f"{file}: unknown config fields {unknown[:5]}", path=file)
    try:
        return CompressorConfig(**meta["config"])
    except ValueError as exc:
        raise CheckpointMismatchError(f"{file}: {exc}", path=file) from None


def read_checked_tensors(file: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors ``file``, which must hold exactly ``expected`` (name: shape).

    Every tensor must have its expected shape and a floating-point dtype, checked from the
    header before any tensor is read, and be finite. The file must be (or link to) a regular file.

    Raises:
        CheckpointMismatchError: naming the file and what is wrong with it.
    """
    from safetensors import SafetensorError, safe_open

    def bad(why: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(f"{file}: {why}", path=file)

    _check_regular_file(file)
    try:
        with safe_open(str(file), framework="pt") as fh:
            names = set(fh.keys())
            missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
            if missing:
                raise bad(f"{len(missing)} expected tensors are missing, e.g. {missing[:3]}")
            if unexpected:
                raise bad(f"the file has tensors that are not expected: {unexpected[:3]}")
            for name, shape in expected.items():
                part = fh.get_slice(name)
                if tuple(part.get_shape()) != shape:
                    raise bad(f"tensor {name} has shape {tuple(part.get_shape())}, {shape} is expected")
                if part.get_dtype() not in _CHECKPOINT_DTYPES:
                    raise bad(f"tensor {name} is {part.get_dtype()}, not floating point")
            tensors = {name: fh.get_tensor(name) for name in expected}
    except SafetensorError as exc:
        raise bad(f"not a valid safetensors file ({exc})") from exc
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise bad(f"tensor {name} holds NaN or infinite values")
    return tensors


def _check_regular_file(file: Path) -> int:
    """The size of ``file``, which must be (or link to) a regular file: a FIFO or a device
    would block or never end when read."""
    try:
        st = os.stat(file)
    except OSError as exc:
        raise CheckpointMismatchError(f"{file} cannot be read ({exc.strerror})", path=file) from exc
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointMismatchError(f"{file} is not a regular file", path=file)
    return st.st_size


def checkpoints_base(checkpoints: Sequence[str | os.PathLike]) -> str | None:
    """The base model the checkpoints were trained for (``None`` for the default model, or no checkpoints).

    Raises:
        CheckpointMismatchError: the checkpoints name different base models (one evaluation runs one model).
    """
    names = {(read_checkpoint(c)[1].get("config") or {}).get("base_model") or None for c in checkpoints}
    names = {None if n in (None, "default", DEFAULT_MODEL) else n for n in names}
    if len(names) > 1:
        raise CheckpointMismatchError(f"the checkpoints were trained for different base models: {sorted(map(str, names))}")
    return next(iter(names), None)


def check_base(folder: Path, meta: dict[str, Any], base: BaseModel) -> None:
    """Raise :class:`CheckpointMismatchError` unless the checkpoint was trained for ``base``.

    Cheap (no weights are read): evaluations call it for every checkpoint before running
    anything, so a wrong checkpoint fails at once instead of after the first systems.
    """
    cfg = meta.get("config") or {}
    if base.fingerprint != cfg.get("base_fingerprint"):
        raise CheckpointMismatchError(
            f"checkpoint {folder.name} was trained for base model {cfg.get('base_model')!r} "
            f"(fingerprint {cfg.get('base_fingerprint')}), but the loaded model {base.name!r} has fingerprint "
            f"{base.fingerprint}; a compressor only works with the model it was trained for")


def causal_lm_of(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def shipped_checkpoints() -> dict[str, Path]:
    """Names and folders of the compressors shipped with the package."""
    if not CHECKPOINT_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(CHECKPOINT_DIR.iterdir()) if (p / "config.json").is_file()}


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a path or a shipped name (``"default"`` = ``"kv-k16"``)."""
    name = str(path)
    if name == "default":
        name = "kv-k16"
    shipped = shipped_checkpoints()
    if name in shipped:
        return shipped[name]
    folder = Path(path).expanduser()
    if (folder / "config.json").is_file():
        return folder
    raise CheckpointNotFoundError(
        f"no compressor checkpoint at {path!r}; shipped names: {sorted(shipped) or 'none'}", path=str(path))


def to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU; from a GPU through page-locked memory (several times faster than a
    plain ``.to("cpu")``, which stages through pageable memory)."""
    if t.device.type != "cuda":
        return t.to("cpu")
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return host


def memory_slot_cache(config: Any, positions: torch.Tensor) -> Any:
    """A K/V cache for one encoder forward that keeps only the keys and values at ``positions``.

    ``positions`` is ``(batch, k)``; after the forward, ``cache.kept[layer]`` holds that layer's
    ``(keys, values)``, each ``(batch, kv_heads, k, head_dim)`` (keys with the rotation of the
    positions they were computed at). Nothing else is stored: no layer keeps the K/V of the
    whole sequence.
    """
    cache = _memory_slots_class()(config=config)
    cache.positions = positions
    cache.kept = [None] * int(config.num_hidden_layers)
    return cache


@functools.lru_cache(maxsize=None)
def _memory_slots_class() -> type:
    from transformers import DynamicCache

    class MemorySlots(DynamicCache):
        """A DynamicCache whose ``update`` keeps only the K/V at ``self.positions`` (see :func:`memory_slot_cache`)."""

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            b, h, _, d = key_states.shape
            idx = self.positions[:, None, :, None].expand(b, h, self.positions.shape[1], d)
            self.kept[layer_idx] = (torch.gather(key_states, 2, idx), torch.gather(value_states, 2, idx))
            return key_states, value_states

    return MemorySlots
