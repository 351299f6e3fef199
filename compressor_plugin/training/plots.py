"""Training curves as PNG."""

from __future__ import annotations

import json
from pathlib import Path


def plot_log(log_path: str | Path, out_path: str | Path, title: str | None = None) -> Path:
    """Plot training loss (and validation loss where logged) against the step.

    A ``mix`` run logs each task's loss too (``loss_regen``, ``loss_qa``, ...); those are drawn
    as their own lines instead of the mixed loss, whose level jumps with the tasks a log window
    happened to draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    tasks: dict[str, list[tuple[int, float]]] = {}
    for line in Path(log_path).read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            train.append((rec["step"], rec["loss"]))
        for key, value in rec.items():
            if key.startswith("loss_"):
                tasks.setdefault(key[len("loss_"):], []).append((rec["step"], value))
        if "val_loss" in rec:
            val.append((rec["step"], rec["val_loss"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    if tasks:
        for task in sorted(tasks):
            ax.plot(*zip(*tasks[task]), label=f"train loss, {task}")
    elif train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or Path(log_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)
