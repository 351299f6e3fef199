"""Evaluation data: JSONL loading, seeded subsets, distractor chunks and benchmark text.

QA files hold one JSON object per line with ``context``, ``question`` and ``answers`` (a list
of gold strings); corpus files hold ``text``. Every sampling step takes an explicit seed, so
two runs with the same arguments evaluate exactly the same questions in the same order.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import DataError  # noqa: F401  (kept importable from here)

#: Environment variable naming a folder of JSONL data files (used by the benchmarks).
DATA_ENV = "COMPRESSOR_PLUGIN_DATA"

#: yes / no / maybe style answer sets (PubMedQA): scored as label accuracy too.
LABEL_ANSWERS = frozenset({"yes", "no", "maybe"})



@dataclass
class QAExample:
    """One QA item, possibly with distractor contexts.

    Attributes:
        id: the row's ``id`` (or its line number).
        question: the question text.
        answers: gold answers (non-empty).
        context: the gold context text.
        contexts: what goes into the prompt, in order (the gold context among distractors when
            the evaluation uses several chunks; otherwise just ``[context]``).
        gold_index: position of the gold context in ``contexts``.
    """

    id: str
    question: str
    answers: list[str]
    context: str
    contexts: list[str] = field(default_factory=list)
    gold_index: int = 0

    def __post_init__(self) -> None:
        if not self.contexts:
            self.contexts = [self.context]


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All JSON objects of a JSONL file (blank lines skipped).

    Raises:
        FileNotFoundError: no such file.
        DataError: a line that is not a JSON object.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    rows: list[dict[str, Any]] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from exc
            except RecursionError:
                raise DataError(f"{p}:{lineno}: not valid JSON (nested too deeply)") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            obj.setdefault("_line", lineno)
            rows.append(obj)
    if not rows:
        raise DataError(f"{p} holds no rows")
    return rows


def seeded_indices(n_rows: int, limit: int | None, seed: int) -> list[int]:
    """Indices of a seeded sample of ``limit`` rows out of ``n_rows``, in file order.

    ``limit=None`` (or a limit at least ``n_rows``) keeps every row.
    """
    if limit is not None and limit < 1:
        raise ValueError("limit must be positive")
    if limit is None or limit >= n_rows:
        return list(range(n_rows))
    return sorted(random.Random(seed).sample(range(n_rows), limit))


def _qa_row(row: dict[str, Any], path: str | os.PathLike) -> tuple[str, str, list[str]]:
    missing = [k for k in ("context", "question", "answers") if k not in row]
    if missing:
        raise DataError(f"{path}:{row.get('_line')}: a QA row needs 'context', 'question' and 'answers'; "
                        f"missing {missing}")
    answers = row["answers"]
    if isinstance(answers, str):
        answers = [answers]
    answers = [str(a) for a in answers if str(a).strip()]
    if not answers:
        raise DataError(f"{path}:{row.get('_line')}: 'answers' is empty")
    context, question = str(row["context"]), str(row["question"])
    if not context.strip():
        raise DataError(f"{path}:{row.get('_line')}: empty context")
    return context, question, answers


def load_qa(path: str | os.PathLike, *, limit: int | None = None, seed: int = 0, chunks: int = 1) -> list[QAExample]:
    """A seeded subset of a QA JSONL file.

    Args:
        path: JSONL with ``context``, ``question`` and ``answers`` per row.
        limit: number of questions (seeded sample, kept in file order); ``None`` for all.
        seed: sampling seed (subset, distractors and chunk order).
        chunks: contexts per question. With ``chunks > 1`` the gold context is placed, at a
            seeded random position, among ``chunks - 1`` distractor contexts drawn from other
            rows of the whole file whose context differs from the gold one.

    Raises:
        DataError: missing fields, or too few distinct contexts for the distractors.
    """
    if chunks < 1:
        raise ValueError("chunks must be >= 1")
    rows = read_jsonl(path)
    parsed = [_qa_row(r, path) for r in rows]
    idx = seeded_indices(len(rows), limit, seed)
    pool = sorted({c for c, _, _ in parsed})
    if chunks > 1 and len(pool) < chunks:
        raise DataError(f"{path} has {len(pool)} distinct contexts; --chunks {chunks} needs at least {chunks}")
    rng = random.Random(seed + 1)
    out: list[QAExample] = []
    for i in idx:
        context, question, answers = parsed[i]
        rid = str(rows[i].get("id", rows[i]["_line"]))
        ex = QAExample(rid, question, answers, context)
        if chunks > 1:
            distractors: list[str] = []
            while len(distractors) < chunks - 1:
                c = pool[rng.randrange(len(pool))]
                if c != context and c not in distractors:
                    distractors.append(c)
            ctxs = distractors + [context]
            rng.shuffle(ctxs)
            ex.contexts = ctxs
            ex.gold_index = ctxs.index(context)
        out.append(ex)
    return out


def is_label_task(examples: Iterable[QAExample]) -> bool:
    """True when every gold answer is yes / no / maybe (PubMedQA-style classification)."""
    golds = [a.strip().lower() for ex in examples for a in ex.answers]
    return bool(golds) and all(a in LABEL_ANSWERS for a in golds)


def load_texts(path: str | os.PathLike, *, limit: int | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """``(id, text)`` pairs for regeneration: the ``text`` field of a corpus file, or the distinct
    ``context`` values of a QA file; a seeded sample of ``limit`` of them, in file order.
    """
    rows = read_jsonl(path)
    items: list[tuple[str, str]] = []
    seen: set[str] = set()
    for r in rows:
        text = r.get("text", r.get("context"))
        if not isinstance(text, str):
            raise DataError(f"{path}:{r.get('_line')}: a row needs a 'text' (corpus) or 'context' (QA) string")
        if not text.strip() or text in seen:
            continue
        seen.add(text)
        items.append((str(r.get("id", r["_line"])), text))
    return [items[i] for i in seeded_indices(len(items), limit, seed)]


# ---------------------------------------------------------------------- benchmark text
def data_dirs() -> list[Path]:
    """Folders searched for benchmark text: ``$COMPRESSOR_PLUGIN_DATA``, ``./shared/data``, ``/work/shared/data``."""
    dirs = []
    if os.environ.get(DATA_ENV):
        dirs.append(Path(os.environ[DATA_ENV]).expanduser())
    dirs += [Path.cwd() / "shared" / "data", Path("/work/shared/data")]
    return dirs


_BENCH_FILES = ("arxiv_abstracts_val.jsonl", "squad1.1_dev.jsonl")


def bench_source(path: str | os.PathLike | None = None) -> tuple[list[str], str]:
    """Texts to build benchmark chunks from, and a description of where they came from.

    ``path`` (a JSONL file) wins; else the first of :data:`_BENCH_FILES` found in
    :func:`data_dirs`; else the bundled few-shot SQuAD contexts (three paragraphs that ship with
    the package), which is enough text for timing but repeats itself.
    """
    candidates: list[Path] = []
    if path is not None:
        candidates.append(Path(path).expanduser())
        if not candidates[0].is_file():
            raise FileNotFoundError(f"benchmark text file not found: {candidates[0]}")
    else:
        candidates = [d / f for d in data_dirs() for f in _BENCH_FILES]
    for c in candidates:
        if c.is_file():
            texts = [t for _, t in load_texts(c, limit=2000, seed=0)]
            if texts:
                return texts, str(c)
    from ..prompts import fewshot_examples

    return [e["context"] for e in fewshot_examples()], "bundled few-shot SQuAD contexts (no data folder found)"


def make_chunks(texts: Sequence[str], tokenizer: Any, n: int, tokens: int, *, offset: int = 0) -> list[str]:
    """``n`` chunks of about ``tokens`` tokens each, cut from the texts in order.

    Texts are concatenated (space separated, cycling when they run out) and the token stream
    is cut into pieces of exactly ``tokens`` ids, which are decoded back to text; re-tokenising
    a decoded piece can differ by a token or two. ``offset`` skips that many source texts, so
    different calls can get different chunks.
    """
    if n < 1 or tokens < 1:
        raise ValueError("n and tokens must be positive")
    if not texts:
        raise ValueError("no source texts")
    need = n * tokens
    ids: list[int] = []
    i = offset
    while len(ids) < need:
        ids.extend(tokenizer(" " + texts[i % len(texts)].strip(), add_special_tokens=False)["input_ids"])
        i += 1
        if i - offset > 100 * len(texts) + need:  # pragma: no cover - a tokenizer producing no ids
            raise ValueError("could not build chunks: the source texts tokenise to nothing")
    return [tokenizer.decode(ids[j * tokens:(j + 1) * tokens]).strip() for j in range(n)]
