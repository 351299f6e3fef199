"""Plot fidelity against the sentence-window share, per compressor, from ``eval qa`` results.

Reads the result files of runs made with ``--question-anchors --window-shares ...`` (plain or
gzip-compressed JSON), groups the ``+q{N}`` / ``+q{N}w{S}`` systems by compressor and share,
and draws three panels: mean agreement F1 with the full-text answer, mean agreement on the
questions the full text answers right, and mean kept exact match, each averaged over the files.

    python scripts/plot_sentence_window.py docs/data/h200-2026-12-02/sentence-window/*.json.gz \\
        --output docs/images/sentence_window.png
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

_NAME = re.compile(r"^(?P<ck>.+?)\+q\d+(?:w(?P<share>\d+))?$")


def read(path: Path) -> dict:
    raw = path.read_bytes()
    return json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path, help="eval qa result JSON (.json or .json.gz)")
    ap.add_argument("--output", type=Path, required=True, help="PNG to write")
    args = ap.parse_args()

    # (compressor, share) -> (file -> (agreement, agreement where full is right, kept EM))
    cells: dict[tuple[str, int], dict[str, tuple[float, float, float]]] = defaultdict(dict)
    for f in args.files:
        res = read(f)
        for name, s in res["systems"].items():
            m = _NAME.match(name)
            if m is None or s.get("agreement_f1") is None:
                continue
            share = int(m.group("share") or 0)
            # one value per data file and chunk count (a share measured twice keeps the first)
            key = f"{Path(res['data']).name}:{res['config'].get('chunks', 1)}"
            cells[(m.group("ck"), share)].setdefault(key, (s["agreement_f1"], s["agreement_f1_full_right"],
                                                           s["kept_em"]))
    if not cells:
        raise SystemExit("no +qN systems with agreement in these files")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = ("agreement F1, all questions", "agreement F1, full text right", "kept EM")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ck in sorted({ck for ck, _ in cells}):
        shares = sorted(s for c, s in cells if c == ck)
        for i, ax in enumerate(axes):
            ys = [sum(v[i] for v in cells[(ck, s)].values()) / len(cells[(ck, s)]) for s in shares]
            n = min(len(cells[(ck, s)]) for s in shares)
            ax.plot([s / 100 for s in shares], ys, marker="o", label=f"{ck} ({n} sets)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("window share of the anchor budget (0 = spans only)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
