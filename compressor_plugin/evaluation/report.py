"""Result files and tables: JSON writing (NaN-safe), markdown tables, run environment."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Mapping, Sequence


def clean_json(obj: Any) -> Any:
    """A copy of ``obj`` that strict JSON can hold: NaN and infinities become ``None``,
    tuples become lists, paths and other objects become strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Mapping):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return clean_json(obj.item())
        except (TypeError, ValueError):
            pass
    return str(obj)


def write_json(path: str | os.PathLike, result: Mapping[str, Any]) -> Path:
    """Write ``result`` as indented strict JSON (via a temporary file, then rename)."""
    p = Path(path).expanduser()
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(clean_json(result), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                   encoding="utf-8")
    os.replace(tmp, p)
    return p


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a result JSON file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"result file not found: {p}")
    return json.loads(p.read_text(encoding="utf-8"))


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats rounded, ``None`` / NaN as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.1e}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(c, digits) for c in r) + " |")
    return "\n".join(lines)


def environment(base: Any = None) -> dict[str, Any]:
    """Versions, host and (when given) the base model identity, for the ``config`` block."""
    import torch
    import transformers

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "host_cpu_count": os.cpu_count(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:  # pragma: no cover - declared dependency
        pass
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
    if base is not None:
        env.update(model=base.name, model_fingerprint=base.fingerprint, device=str(base.device),
                   dtype=str(base.dtype).replace("torch.", ""))
    return env


def qa_table(result: Mapping[str, Any]) -> str:
    """Markdown table of an ``eval qa`` result."""
    label = bool(result.get("config", {}).get("label_task"))
    headers = ["system", "F1", "EM"] + (["acc"] if label else []) + \
              ["retention F1", "agreement F1", "agreement EM", "kept EM", "n", "prompt tok", "tok/chunk", "source tok",
               "ratio", "seconds"]
    rows = []
    for name, s in result["systems"].items():
        rows.append([name, s.get("f1"), s.get("em")] + ([s.get("accuracy")] if label else []) +
                    [s.get("retention_f1"), s.get("agreement_f1"), s.get("agreement_em"), s.get("kept_em"), s.get("n"),
                     s.get("prompt_tokens_mean"), s.get("tokens_per_chunk"), s.get("source_tokens_mean"),
                     s.get("compression_ratio"), s.get("seconds")])
    return markdown_table(headers, rows)


def regen_table(result: Mapping[str, Any]) -> str:
    """Markdown table of an ``eval regen`` result: overall and per length bucket ROUGE-L F."""
    buckets: list[str] = []
    for s in result["systems"].values():
        for b in s.get("by_length", {}):
            if b not in buckets:
                buckets.append(b)
    buckets.sort(key=_bucket_key)
    headers = ["system", "ROUGE-L F", "BLEU", "n", "prompt tok", "source tok", "seconds"] + \
              [f"R-L {b}" for b in buckets]
    rows = []
    for name, s in result["systems"].items():
        by = s.get("by_length", {})
        rows.append([name, s.get("rouge_l"), s.get("bleu"), s.get("n"), s.get("prompt_tokens_mean"),
                     s.get("source_tokens_mean"), s.get("seconds")] +
                    [by.get(b, {}).get("rouge_l") for b in buckets])
    return markdown_table(headers, rows)


def _bucket_key(label: str) -> tuple[int, int]:
    digits = "".join(ch for ch in label if ch.isdigit())
    return (1 if label.startswith(">") else 0, int(digits or 0))
