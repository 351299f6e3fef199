"""Reading a corpus and splitting it into token-bounded chunks.

Inputs are JSONL files (one document per line, text in a field), ``.txt`` / ``.md`` files (one
document per file), or a folder of them. Reading never raises on bad data: unreadable files,
bytes that are not UTF-8, lines that are not JSON objects, missing text fields, empty
documents and oversized files or lines are skipped and counted by reason in a
:class:`collections.Counter`.

Every input file is opened once, by descriptor, and checked on that descriptor (a regular
file, and, unless symlinks are followed, a file whose real location is inside the input
folder) before a byte is read: a file swapped for a symlink, a FIFO or a device after the
folder was listed is skipped, never read or waited on.

Splitting is token-aware: a document is tokenised once with the compressor's tokenizer
(``return_offsets_mapping=True``), chunks end on token boundaries, and near the token limit a
cut at a paragraph break is preferred to one at a sentence end, which is preferred to one at a
word boundary; a hard cut between two tokens is the last resort. Each chunk records its
character span in the document text as read, so chunks can be joined back to their sources:
``normalize_text(document_text[start:end])`` is the chunk text that was hashed and compressed.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..text import literal_ids, lone_surrogate
from ..store import normalize_text

#: File name endings read as JSONL (one JSON object per line).
JSONL_SUFFIXES = (".jsonl", ".ndjson")
#: File name endings read as one plain-text document per file.
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text", ".rst")
#: Fields tried, in order, for the document text when no text field is given.
DEFAULT_TEXT_FIELDS = ("text", "context")

# Skip reasons (keys of the skipped counter).
UNREADABLE_FILE = "unreadable_file"
NOT_UTF8 = "not_utf8"
BAD_JSON = "bad_json"
NOT_AN_OBJECT = "not_a_json_object"
MISSING_TEXT = "missing_text_field"
EMPTY_DOCUMENT = "empty_document"
LONE_SURROGATE = "lone_surrogate"
UNSUPPORTED_FILE = "unsupported_file"
OUTSIDE_INPUT = "outside_input"
TOO_LARGE = "too_large"
EMPTY_CHUNK = "whitespace_only_chunk"
OVER_LIMIT = "chunk_over_token_limit"
_MAX_RESPLITS = 6

#: Most bytes read from one ``.txt`` / ``.md`` file (one document); larger files are skipped
#: as ``too_large`` without being read.
MAX_TEXT_FILE_BYTES = 64 * 2**20
#: Most bytes of one JSONL line; a longer line is skipped as ``too_large`` (the rest of it is
#: read past in bounded pieces, never held whole) and the lines after it are read.
MAX_JSONL_LINE_BYTES = 16 * 2**20
_SKIP_PIECE = 2**20
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_BINARY", 0))

# Boundary scores of a cut between two tokens.
_HARD, _WORD, _SENTENCE, _PARAGRAPH = 0, 1, 2, 3
#: (score, lowest fill of the chunk at which a cut of that score is taken), best first.
_PREFERENCES = ((_PARAGRAPH, 0.5), (_SENTENCE, 0.5), (_WORD, 0.8))

# A whitespace run holding at least one newline (two or more newlines: a paragraph break).
_NEWLINE_RUN = re.compile(r"[^\S\n]*\n\s*")
# Sentence-final punctuation (with closing quotes/brackets) followed by whitespace and then
# something that is not a lower-case ASCII letter ("e.g. the" and "U.S. is" are not ends).
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f][\"'\u201d\u2019)\]]*(\s+)(?=[^\sa-z]|$)")
_WS_CODES = np.array([9, 10, 11, 12, 13, 32, 0x85, 0xA0, 0x1680, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
                     + list(range(0x2000, 0x200B)), dtype=np.uint32)


@dataclass(frozen=True)
class Document:
    """One input document.

    Attributes:
        doc_id: the JSONL id field, or ``"<source>:<line>"`` when a line has none, or the
            file's path relative to the input for text files.
        text: the document text as read (decoded UTF-8; spans index this string).
        source: the file it came from, relative to the input path (its name for a single file).
        line: 1-based line number in a JSONL file, None for text files.
        nbytes: input bytes this document was read from (for progress estimates).
    """

    doc_id: str
    text: str
    source: str
    line: int | None = None
    nbytes: int = 0


@dataclass(frozen=True)
class Chunk:
    """One chunk of a document: the unit that is compressed and stored.

    Attributes:
        doc_id, source, line: the document it comes from (see :class:`Document`).
        index: 0-based position of the chunk in its document.
        start, end: character span in the document text; ``normalize_text(text[start:end])``
            equals :attr:`text`.
        text: the normalised chunk text (what is hashed and compressed).
        ids: its token ids (the compressor's tokenizer, no special tokens).
    """

    doc_id: str
    source: str
    line: int | None
    index: int
    start: int
    end: int
    text: str
    ids: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------------------------- reading
def input_files(path: str | os.PathLike, *, follow_symlinks: bool = False,
                skipped: Counter | None = None) -> tuple[Path, list[Path]]:
    """The root and the files to read for an input path (a file, or a folder walked recursively).

    Hidden files and folders (names starting with ``.``) are left out; in a folder, files with
    other endings than :data:`JSONL_SUFFIXES` and :data:`TEXT_SUFFIXES` are listed too and
    counted as unsupported when read. Symlinked folders are not entered, and a symlinked file
    whose target lies outside the folder is left out (counted as ``outside_input`` in
    ``skipped``) unless ``follow_symlinks``: a link planted in a corpus folder cannot pull in
    other files of the machine.

    Raises:
        FileNotFoundError: the path does not exist.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p.parent, [p]
    if not p.is_dir():
        raise FileNotFoundError(f"input not found: {p}")
    real_root = os.path.realpath(p)
    files = []
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(n for n in filenames if not n.startswith(".")):
            f = Path(dirpath) / name
            if not follow_symlinks and f.is_symlink() and os.path.commonpath(
                    [real_root, os.path.realpath(f)]) != real_root:
                if skipped is not None:
                    skipped[OUTSIDE_INPUT] += 1
                continue
            files.append(f)
    return p, files


def total_input_bytes(files: Sequence[Path]) -> int:
    """Sum of the sizes of ``files`` (unreadable ones count 0)."""
    total = 0
    for f in files:
        try:
            total += f.stat().st_size
        except OSError:
            pass
    return total


def iter_documents(
    path: str | os.PathLike,
    *,
    text_field: str | None = None,
    id_field: str = "id",
    skipped: Counter | None = None,
    limit: int | None = None,
    follow_symlinks: bool = False,
) -> Iterator[Document]:
    """Yield the documents of a file or folder, counting what is skipped and why.

    Args:
        path: a JSONL file, a text file, or a folder of them (read recursively, in sorted order).
        text_field: JSONL field holding the text; default the first of ``"text"``, ``"context"``
            that a line has.
        id_field: JSONL field holding the document id (lines without it get ``"<file>:<line>"``).
        skipped: a Counter that receives one count per skipped input, keyed by reason
            (``unreadable_file``, ``not_utf8``, ``bad_json``, ``not_a_json_object``,
            ``missing_text_field``, ``empty_document``, ``unsupported_file``, ``outside_input``,
            ``too_large``: a text file over :data:`MAX_TEXT_FILE_BYTES` or a JSONL line over
            :data:`MAX_JSONL_LINE_BYTES`).
        limit: stop after this many documents.
        follow_symlinks: also read symlinked files whose target lies outside the folder (see
            :func:`input_files`).
    """
    skipped = skipped if skipped is not None else Counter()
    root, files = input_files(path, follow_symlinks=follow_symlinks, skipped=skipped)
    single = Path(path).expanduser().is_file()
    # Where files may be read from: anywhere for a single file named as the input (the user
    # chose it) or with follow_symlinks, else only inside the folder's real path.
    inside = None if single or follow_symlinks else os.path.realpath(root)
    count = 0
    for f in files:
        if limit is not None and count >= limit:
            return
        rel = f.name if single else f.relative_to(root).as_posix()
        suffix = f.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            reader = _read_jsonl(f, rel, text_field, id_field, skipped, inside)
        elif suffix in TEXT_SUFFIXES or single:
            reader = _read_text_file(f, rel, skipped, inside)
        else:
            skipped[UNSUPPORTED_FILE] += 1
            continue
        for doc in reader:
            yield doc
            count += 1
            if limit is not None and count >= limit:
                return


def _inside(real: str, root: str) -> bool:
    try:
        return os.path.commonpath([root, real]) == root
    except ValueError:  # another drive (Windows), or a relative path
        return False


def _fd_path(fd: int) -> str | None:
    """The real path of the file open on ``fd`` where the system tells it (Linux ``/proc``), else None."""
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except (OSError, ValueError):
        return None
    if real.endswith(" (deleted)") and not os.path.exists(real):  # removed since it was opened
        real = real[: -len(" (deleted)")]
    return real if os.path.isabs(real) else None


def _fd_inside(fd: int, st: os.stat_result, f: Path, root: str) -> bool:
    """Whether the file open on ``fd`` lies inside the folder ``root`` (a real path)."""
    real = _fd_path(fd)
    if real is not None:
        return _inside(real, root)
    # No /proc: the path's real location now must be inside and be the very file that is open.
    real = os.path.realpath(f)
    try:
        now = os.stat(real)
    except OSError:
        return False
    return _inside(real, root) and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _open_input(f: Path, skipped: Counter, inside: str | None) -> tuple[int, os.stat_result] | None:
    """A descriptor open for reading on the regular file ``f``, and its stat; None when skipped (counted).

    The file is opened once (never blocking: ``O_NONBLOCK``), and everything is checked on the
    descriptor, so what is read is what was checked. With ``inside`` (the input folder's real
    path) the last path component is not followed (``O_NOFOLLOW``); a file that has become a
    symlink is read only if it leads to a regular file inside the folder, and any file whose
    real location is outside the folder (a parent folder swapped for a symlink) is skipped as
    ``outside_input``.
    """
    if not f.is_file():  # cheap first filter: never open a FIFO or a device listed as such
        skipped[UNREADABLE_FILE] += 1
        return None
    nofollow = getattr(os, "O_NOFOLLOW", 0) if inside is not None else 0
    try:
        fd = os.open(f, _OPEN_FLAGS | nofollow)
    except OSError as exc:
        if not nofollow or exc.errno not in (errno.ELOOP, errno.EMLINK) or not os.path.islink(f):
            skipped[UNREADABLE_FILE] += 1
            return None
        # The file is now a symlink: read it only if it stays in the folder (as the listing
        # allows), checked again on the descriptor below.
        if not _inside(os.path.realpath(f), inside):
            skipped[OUTSIDE_INPUT] += 1
            return None
        try:
            fd = os.open(f, _OPEN_FLAGS)
        except OSError:
            skipped[UNREADABLE_FILE] += 1
            return None
    try:
        st = os.fstat(fd)
        if inside is not None and not _fd_inside(fd, st, f, inside):
            skipped[OUTSIDE_INPUT] += 1
        elif not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
            skipped[UNREADABLE_FILE] += 1
        else:
            try:
                os.set_blocking(fd, True)
            except (AttributeError, OSError):  # regular files ignore O_NONBLOCK anyway
                pass
            return fd, st
    except OSError:
        skipped[UNREADABLE_FILE] += 1
    os.close(fd)
    return None


def _read_text_file(f: Path, rel: str, skipped: Counter, inside: str | None = None) -> Iterator[Document]:
    opened = _open_input(f, skipped, inside)
    if opened is None:
        return
    fd, st = opened
    cap = MAX_TEXT_FILE_BYTES
    try:
        with os.fdopen(fd, "rb") as fh:
            if st.st_size > cap:
                skipped[TOO_LARGE] += 1
                return
            data = fh.read(st.st_size + 1)  # not read(cap + 1): that would allocate the cap for every file
            if len(data) > st.st_size:  # it grew since fstat: read on in bounded pieces, up to the cap
                parts, total = [data], len(data)
                while total <= cap:
                    piece = fh.read(min(_SKIP_PIECE, cap + 1 - total))
                    if not piece:
                        break
                    parts.append(piece)
                    total += len(piece)
                if total > cap:
                    skipped[TOO_LARGE] += 1
                    return
                data = b"".join(parts)
        if len(data) > cap:
            skipped[TOO_LARGE] += 1
            return
        text = data.decode("utf-8-sig")
    except OSError:
        skipped[UNREADABLE_FILE] += 1
        return
    except UnicodeDecodeError:
        skipped[NOT_UTF8] += 1
        return
    except MemoryError:
        skipped[TOO_LARGE] += 1
        return
    if not text.strip():
        skipped[EMPTY_DOCUMENT] += 1
        return
    yield Document(doc_id=rel, text=text, source=rel, line=None, nbytes=len(data))


def _read_jsonl(f: Path, rel: str, text_field: str | None, id_field: str, skipped: Counter,
                inside: str | None = None) -> Iterator[Document]:
    opened = _open_input(f, skipped, inside)
    if opened is None:
        return
    fh = os.fdopen(opened[0], "rb")
    cap = MAX_JSONL_LINE_BYTES
    with fh:
        lineno = 0
        while True:
            try:
                raw = fh.readline(cap + 1)
                if len(raw) > cap and not raw.endswith(b"\n"):
                    # too long: read past the rest of the line in bounded pieces, never holding it
                    while True:
                        piece = fh.readline(_SKIP_PIECE)
                        if not piece or piece.endswith(b"\n"):
                            break
                    lineno += 1
                    skipped[TOO_LARGE] += 1
                    continue
            except OSError:
                skipped[UNREADABLE_FILE] += 1
                return
            except MemoryError:
                skipped[TOO_LARGE] += 1
                return
            if not raw:
                return
            lineno += 1
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                skipped[NOT_UTF8] += 1
                continue
            except MemoryError:
                skipped[TOO_LARGE] += 1
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                skipped[BAD_JSON] += 1
                continue
            except MemoryError:
                skipped[TOO_LARGE] += 1
                continue
            if not isinstance(obj, dict):
                skipped[NOT_AN_OBJECT] += 1
                continue
            fields = (text_field,) if text_field else DEFAULT_TEXT_FIELDS
            text = next((obj[k] for k in fields if k in obj), None)
            if not isinstance(text, str):
                skipped[MISSING_TEXT] += 1
                continue
            if not text.strip():
                skipped[EMPTY_DOCUMENT] += 1
                continue
            if lone_surrogate(text) is not None:  # a "\ud800" escape: not Unicode, no tokenizer takes it
                skipped[LONE_SURROGATE] += 1
                continue
            doc_id = obj.get(id_field)
            doc_id = f"{rel}:{lineno}" if doc_id is None else str(doc_id)
            yield Document(doc_id=doc_id, text=text, source=rel, line=lineno, nbytes=len(raw))


# ---------------------------------------------------------------------------------- splitting
def boundary_scores(text: str, ends: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Score of cutting after each token: 3 paragraph break, 2 sentence end or line break,
    1 word boundary, 0 inside a word, -1 inside a character (tokens sharing a character).

    ``ends[j]`` is the character offset where token ``j`` ends; a cut after token ``j`` is at
    that offset. Computed with regular expressions over the whole text and binary search over
    the offsets, so the cost is linear in the document and not per token in Python.
    """
    n = len(ends)
    scores = np.zeros(n, dtype=np.int8)
    if n == 0:
        return scores
    length = len(text)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    is_ws = np.isin(codes, _WS_CODES)
    pos = np.clip(ends, 0, length)
    before = np.zeros(n, dtype=bool)
    after = np.zeros(n, dtype=bool)
    ok = pos > 0
    before[ok] = is_ws[pos[ok] - 1]
    ok = pos < length
    after[ok] = is_ws[pos[ok]]
    scores[before | after] = _WORD

    def mark(lo: int, hi: int, value: int) -> None:
        a = int(np.searchsorted(ends, lo, side="left"))
        b = int(np.searchsorted(ends, hi, side="right"))
        if a < b:
            np.maximum(scores[a:b], value, out=scores[a:b])

    for m in _SENTENCE_END.finditer(text):
        mark(m.start(1), m.end(1), _SENTENCE)
    for m in _NEWLINE_RUN.finditer(text):
        mark(m.start(), m.end(), _PARAGRAPH if m.group().count("\n") >= 2 else _SENTENCE)
    # A cut between two tokens that share a character would split that character.
    if n > 1:
        split_char = starts[1:] < ends[:-1]
        scores[:-1][split_char] = -1
    return scores


def token_spans(scores: np.ndarray, budget: int, overlap: int = 0) -> list[tuple[int, int]]:
    """Token spans ``[(start, end), ...]`` covering ``len(scores)`` tokens, each at most ``budget`` long.

    Greedy from the left: each chunk ends at the best boundary near the limit (see the module
    docstring); the next starts ``overlap`` tokens before the previous end.
    """
    n = len(scores)
    if n <= budget:
        return [(0, n)] if n else []
    spans: list[tuple[int, int]] = []
    s = 0
    while s < n:
        if n - s <= budget:
            spans.append((s, n))
            break
        hi = s + budget  # exclusive end at the limit; cut after token hi - 1
        end = 0
        for score, fill in _PREFERENCES:
            lo = s + max(1, math.ceil(fill * budget)) - 1
            hits = np.flatnonzero(scores[lo:hi] >= score)
            if hits.size:
                end = lo + int(hits[-1]) + 1
                break
        if not end:
            hits = np.flatnonzero(scores[s:hi] >= _HARD)
            end = s + int(hits[-1]) + 1 if hits.size else hi
        spans.append((s, end))
        s = max(end - overlap, s + 1)
    return spans


def _is_normalized(text: str) -> bool:
    """True if ``normalize_text(text) == text`` (checked without building a copy where possible)."""
    return bool(text) and not text[0].isspace() and not text[-1].isspace() and unicodedata.is_normalized("NFC", text)


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


class TokenChunker:
    """Splits documents into chunks of at most ``chunk_tokens`` tokens of ``tokenizer``.

    Args:
        tokenizer: a Hugging Face fast tokenizer (offsets are needed); use the compressor's.
        chunk_tokens: the most tokens a chunk may have (counted as the compressor counts
            them: the normalised chunk text tokenised on its own, no special tokens).
        overlap: tokens repeated from the end of one chunk at the start of the next.
    """

    def __init__(self, tokenizer: Any, chunk_tokens: int = 512, overlap: int = 0):
        if int(chunk_tokens) < 1:
            raise ValueError("chunk_tokens must be at least 1")
        if not 0 <= int(overlap) < int(chunk_tokens):
            raise ValueError(f"overlap must be between 0 and chunk_tokens - 1 ({chunk_tokens - 1}), not {overlap}")
        if not getattr(tokenizer, "is_fast", True):
            raise ValueError("token-aware chunking needs a fast tokenizer (offset mappings)")
        self.tokenizer = tokenizer
        self.chunk_tokens = int(chunk_tokens)
        self.overlap = int(overlap)
        # Re-tokenising a chunk on its own can add a token or two at its edges (a word that lost
        # its leading space); aim slightly lower so that seldom needs a second pass.
        self._aim = self.chunk_tokens - (2 if self.chunk_tokens >= 64 else 0)

    def _encode(self, texts: list[str], offsets: bool) -> Any:
        return literal_ids(self.tokenizer, texts, return_offsets_mapping=offsets, return_attention_mask=False,
                           verbose=False)

    def _spans(self, text: str, offsets: Sequence[tuple[int, int]], budget: int, overlap: int) -> list[tuple[int, int]]:
        if not offsets:
            return []
        if len(offsets) <= budget:
            return [(int(offsets[0][0]), int(offsets[-1][1]))]
        arr = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        starts, ends = arr[:, 0], arr[:, 1]
        scores = boundary_scores(text, ends, starts)
        return [(int(starts[a]), int(ends[b - 1])) for a, b in token_spans(scores, budget, overlap)]

    def split(self, docs: Sequence[Document], skipped: Counter | None = None) -> list[Chunk]:
        """Chunks of ``docs``, in document order then chunk order.

        Tokenisation is done in two bulk calls (documents with offsets, then the chunk texts).
        Whitespace-only pieces are dropped and counted as ``whitespace_only_chunk`` in ``skipped``.
        """
        skipped = skipped if skipped is not None else Counter()
        if not docs:
            return []
        enc = self._encode([d.text for d in docs], offsets=True)
        # (doc index, char start, char end) of every candidate chunk
        pieces: list[tuple[int, int, int]] = []
        out: list[tuple[int, int, int, str, list[int]]] = []
        for di, (doc, offs, ids) in enumerate(zip(docs, enc["offset_mapping"], enc["input_ids"])):
            text = doc.text
            if len(ids) <= self.chunk_tokens and _is_normalized(text):
                # The whole document is one chunk and already in normalised form: its token ids
                # are the chunk's ids, no second tokenisation needed.
                out.append((di, 0, len(text), text, list(ids)))
                continue
            for a, b in self._spans(text, offs, self._aim, self.overlap):
                a, b = _strip_span(text, a, b)
                pieces.append((di, a, b))
        for attempt in range(_MAX_RESPLITS + 1):
            if not pieces:
                break
            texts = [normalize_text(docs[di].text[a:b]) for di, a, b in pieces]
            keep = [i for i, t in enumerate(texts) if t]
            if len(keep) < len(pieces):
                skipped[EMPTY_CHUNK] += len(pieces) - len(keep)
            ids = self._encode([texts[i] for i in keep], offsets=False)["input_ids"] if keep else []
            redo: list[tuple[int, int, int, int]] = []
            for i, row in zip(keep, ids):
                di, a, b = pieces[i]
                if len(row) <= self.chunk_tokens:
                    out.append((di, a, b, texts[i], list(row)))
                else:
                    redo.append((di, a, b, len(row)))
            pieces = []
            if attempt == _MAX_RESPLITS:
                if redo:
                    skipped[OVER_LIMIT] += len(redo)
                break
            for di, a, b, n in redo:  # seldom: split that piece again with a proportionally smaller aim
                sub = docs[di].text[a:b]
                offs = self._encode([sub], offsets=True)["offset_mapping"][0]
                aim = max(1, min(self._aim, len(offs)) * self.chunk_tokens // n - attempt)
                for sa, sb in self._spans(sub, offs, aim, min(self.overlap, aim - 1)):
                    sa, sb = _strip_span(sub, sa, sb)
                    pieces.append((di, a + sa, a + sb))
        out.sort(key=lambda r: (r[0], r[1], r[2]))
        chunks: list[Chunk] = []
        counters: Counter = Counter()
        for di, a, b, text, row in out:
            doc = docs[di]
            idx = counters[di]
            counters[di] += 1
            chunks.append(Chunk(doc.doc_id, doc.source, doc.line, idx, a, b, text, row))
        return chunks
