"""Checks on input text, and literal tokenisation, shared by the compressor and the generator."""

from __future__ import annotations

import functools
import weakref
from typing import Any


def lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate (U+D800..U+DFFF) in ``text``, or None if it is valid Unicode.

    Such characters come from decoding bytes with ``errors="surrogateescape"`` or from broken
    JSON escapes; tokenizers cannot encode them.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return int(exc.start)
    return None


def surrogate_message(text: str, index: int, what: str) -> str:
    """A readable error message for a lone surrogate at ``index`` of ``text``, naming ``what`` holds it."""
    around = text[max(0, index - 20): index + 20].encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    return (f"{what} contains a lone surrogate U+{ord(text[index]):04X} at character {index} (near {around!r}); "
            "it is not valid Unicode and cannot be tokenised. Decode the source bytes with errors='replace' or "
            "remove the character")


def check_text(text: str, what: str) -> None:
    """Raise :class:`~compressor_plugin.errors.InvalidTextError` if ``text`` holds a lone surrogate.

    ``what`` names the text in the message ("document 'a'", "message 2 (user)").
    """
    at = lone_surrogate(text)
    if at is not None:
        from .errors import InvalidTextError

        raise InvalidTextError(surrogate_message(text, at, what))


def literal_ids(tokenizer: Any, text: str | list[str], **kwargs: Any) -> Any:
    """Token ids of ``text`` read as plain characters: no special tokens added, none recognised.

    A tokenizer called the usual way turns a string such as ``<|im_end|>`` or ``<s>`` found in
    the text into the control token of that name. Text that comes from documents, users or a
    store must never do that (a retrieved page could otherwise end the user's turn and open a
    system turn), so every chunk, anchor and chat message is tokenised through this function:
    such strings become the ordinary tokens that spell them. A list of texts gives a list of
    id lists; extra keyword arguments (``return_offsets_mapping``...) go to the tokenizer, and
    the tokenizer's whole output is returned when any are given.
    """
    fast = _literal_backend(tokenizer) if set(kwargs) <= _FAST_KWARGS and not kwargs.get("return_attention_mask") else None
    if fast is not None:  # the same ids without the wrapper's per-call work (a third of the time on short texts)
        batch = [text] if isinstance(text, str) else list(text)
        encodings = fast.encode_batch(batch, add_special_tokens=False) if batch else []
        ids = [e.ids for e in encodings]
        offsets = [list(e.offsets) for e in encodings] if kwargs.get("return_offsets_mapping") else None
        specials = _LITERAL_BACKENDS[tokenizer][2]
        if specials and any(not specials.isdisjoint(row) for row in ids):  # rare: see respell
            table = respell_table(tokenizer)
            spelled = [respell(row, table, offs) for row, offs in zip(ids, offsets or [None] * len(ids))]
            ids = [row for row, _ in spelled]
            offsets = [offs for _, offs in spelled] if offsets is not None else None
        if kwargs:
            out: dict[str, Any] = {"input_ids": ids[0] if isinstance(text, str) else ids}
            if offsets is not None:
                out["offset_mapping"] = offsets[0] if isinstance(text, str) else offsets
            return out
        return ids[0] if isinstance(text, str) else ids
    shared_switch = hasattr(getattr(tokenizer, "_tokenizer", None), "encode_special_tokens")
    for _ in range(3):
        out = tokenizer(text, add_special_tokens=False, split_special_tokens=True, **kwargs)
        ids = out["input_ids"]
        if not shared_switch:
            return out if kwargs else ids
        # a fast tokenizer's switch for this is shared: a usual call in another thread may flip it
        # between setting and encoding; literal text never gives a control token, so try again
        rows = [ids] if isinstance(text, str) else ids
        found = control_token_ids(tokenizer) & {int(i) for row in rows for i in row}
        if not found:
            return out if kwargs else ids
        if found <= _special_ids(tokenizer)[2]:  # the vocabulary, not another thread: spell them out
            return _respelled_output(out, text, respell_table(tokenizer), bool(kwargs))
    raise RuntimeError("the tokenizer kept reading control tokens from text asked for as literal characters "
                       "(another thread keeps switching its special-token reading); tokenise from one thread")


def respell_table(tokenizer: Any) -> dict[int, tuple[int, ...]]:
    """For each control token that literal text can still reach, the ids that spell it.

    A vocabulary may hold a control token's spelling as an ordinary piece: a Unigram model
    (SentencePiece) keeps ``"</s>"`` among its pieces, so even literal tokenisation of a text that
    says ``</s>`` gives the eos id. :func:`literal_ids` then replaces that id with the ids of its
    characters, each its own piece where the vocabulary has one (``<``, ``/``, ``s``, ``>``), else
    its UTF-8 bytes as byte-fallback pieces (``<0x3C>``), else the unknown token: the text still
    reads as characters and ends no turn. Only ids of :func:`control_token_ids` are replaced.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    never = control_token_ids(tokenizer)
    table: dict[int, tuple[int, ...]] = {}
    for cid in never:
        piece = tokenizer.convert_ids_to_tokens(int(cid))
        spelled: list[int] = []
        for ch in piece if isinstance(piece, str) else "":
            own = _piece_id(tokenizer, ch)
            raw = [_piece_id(tokenizer, f"<0x{b:02X}>") for b in ch.encode("utf-8")]
            if own is not None and own not in never:
                spelled.append(own)
            elif raw and all(r is not None and r not in never for r in raw):
                spelled += [int(r) for r in raw if r is not None]
            elif unk is not None:
                spelled.append(int(unk))
        table[int(cid)] = tuple(spelled)
    return table


def _piece_id(tokenizer: Any, piece: str) -> int | None:
    """The id of a vocabulary piece, None where the vocabulary has no such piece."""
    i = tokenizer.convert_tokens_to_ids(piece)
    return None if i is None or i == getattr(tokenizer, "unk_token_id", None) else int(i)


def respell(ids: list[int], table: dict[int, tuple[int, ...]], offsets: list[Any] | None = None
            ) -> tuple[list[int], list[Any] | None]:
    """``ids`` with each id of ``table`` replaced by its spelling (:func:`respell_table`); the
    offsets, when given, repeat the replaced token's span for each id that spells it."""
    out = [x for i in ids for x in table.get(i, (i,))]
    return out, [offsets[j] for j in _sources(ids, table)] if offsets is not None else None


def _sources(ids: list[int], table: dict[int, tuple[int, ...]]) -> list[int]:
    """For each id of ``respell(ids, table)``, the index in ``ids`` of the token it comes from."""
    return [j for j, i in enumerate(ids) for _ in range(len(table[i]) if i in table else 1)]


def _respelled_output(out: Any, text: str | list[str], table: dict[int, tuple[int, ...]], whole: bool) -> Any:
    """The wrapper's output with control ids spelled out: ids, and every other per-token field
    (offsets, attention mask...) repeated for each id that spells a replaced token."""
    single = isinstance(text, str)
    rows = [out["input_ids"]] if single else out["input_ids"]
    spelled = []
    fields = {name: ([v] if single else v) for name, v in out.items() if name != "input_ids"} if whole else {}
    new_fields: dict[str, list] = {name: [] for name in fields}
    for r, row in enumerate(rows):
        ids = [int(i) for i in row]
        src = _sources(ids, table)
        spelled.append(respell(ids, table)[0])
        for name, values in fields.items():
            new_fields[name].append([values[r][j] for j in src])
    if not whole:
        return spelled[0] if single else spelled
    out["input_ids"] = spelled[0] if single else spelled
    for name, values in new_fields.items():
        out[name] = values[0] if single else values
    return out


#: keyword arguments of literal_ids that the private copy serves itself (the rest go to the wrapper)
_FAST_KWARGS = frozenset({"return_offsets_mapping", "return_attention_mask", "verbose"})

#: tokenizer -> (what the copy was made from: its Rust tokenizer, size and added tokens; the copy;
#: the ids of its special added tokens)
_LITERAL_BACKENDS: "weakref.WeakKeyDictionary[Any, tuple[tuple, Any]]" = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=None)
def _stock_fast(kind: type) -> bool:
    """Whether tokenizers of class ``kind`` tokenise as Hugging Face's fast tokenizer does (not
    a subclass with its own ``__call__`` or ``_encode_plus``)."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return (issubclass(kind, PreTrainedTokenizerFast) and kind.__call__ is PreTrainedTokenizerFast.__call__
            and kind._encode_plus is PreTrainedTokenizerFast._encode_plus)


def _literal_backend(tokenizer: Any) -> Any:
    """A private copy of the Rust tokenizer behind a stock Hugging Face fast tokenizer, switched
    to read special-token strings as plain text; None where calling it could give other ids than
    calling the tokenizer (a subclass that tokenises its own way, a pipeline that cannot be
    copied). Like the wrapper's literal call, the copy never pads or truncates, whatever the
    shared Rust tokenizer was last set to.

    The wrapper reads special tokens or not by a switch on the Rust tokenizer that every call
    sets; a copy that only this module uses cannot have that switch flipped by another thread's
    usual call between setting it and encoding. The copy is made again when the tokenizer's
    size or its added tokens change (``add_tokens``, ``add_special_tokens``). It does not follow
    edits made in place to the Rust tokenizer's normalizer or pre-tokenizer after first use.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str") or not _stock_fast(type(tokenizer)):
        return None
    return _private_copy(tokenizer, backend)


def _private_copy(tokenizer: Any, backend: Any) -> Any:
    """The private literal copy of ``backend``, the Rust tokenizer of ``tokenizer`` (see
    :func:`_literal_backend`); None where it cannot be copied or the tokenizer cannot be weakly
    referenced."""
    added = backend.get_added_tokens_decoder()
    made_from = (id(backend), len(tokenizer), tuple((i, t.content, t.special) for i, t in added.items()))
    try:
        known = _LITERAL_BACKENDS.get(tokenizer)
    except TypeError:  # cannot be weakly referenced
        return None
    if known is None or known[0] != made_from:
        from tokenizers import Tokenizer

        try:
            own = Tokenizer.from_str(backend.to_str())
        except Exception:  # a custom (Python) component cannot be serialised: the wrapper, from now on
            own = None
        else:
            own.encode_special_tokens = True
            own.no_padding()  # the wrapper's literal call turns both off too, whatever they were set to
            own.no_truncation()
        # the special added tokens: literal text that gives one of them needs a second look (respell)
        known = (made_from, own, frozenset(i for i, t in added.items() if t.special))
        _LITERAL_BACKENDS[tokenizer] = known
    return known[1]


def has_control_text(tokenizer: Any, text: str) -> bool:
    """Whether ``text`` spells a control token of ``tokenizer`` (``<|im_start|>``, ``</s>``...).

    True when reading the text the usual way gives other ids than :func:`literal_ids`, and some
    of them are special-token ids that literal text never gives. A special token that is an
    ordinary piece of the vocabulary (``add_special_tokens({"pad_token": "!"})``) changes how
    the usual reading splits the text, not what it can say, so it alone does not count.
    """
    usual = tokenizer(text, add_special_tokens=False)["input_ids"]
    return usual != literal_ids(tokenizer, text) and not _special_ids(tokenizer)[0].isdisjoint(usual)


def control_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the tokenizer's control tokens (``<|im_start|>``, ``</s>``...): what literal text never gives.

    These are its special tokens (the added tokens marked special, and what the special-token
    attributes name: bos, eos, pad...) that :func:`literal_ids` does not give, and its bos and
    eos wherever they are added special tokens. Left out are the unknown token (literal text
    may hold characters a vocabulary lacks) and :func:`ordinary_special_ids`: an ordinary token
    named as a special one (``tokenizer.pad_token = "!"``, ``add_special_tokens({"mask_token":
    "the"})``) is still what literal text gives for ``!`` or ``the``.
    """
    never = _special_ids(tokenizer)[0]
    unk = getattr(tokenizer, "unk_token_id", None)
    return never - {unk} if unk in never else never


def ordinary_special_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the tokenizer's special tokens that literal text gives too: ordinary vocabulary
    pieces named as special tokens (``tokenizer.pad_token = "!"``).

    A special token is ordinary when :func:`literal_ids` of its spelling (alone, or after a
    letter) holds its id, read by a private copy of the Rust tokenizer that no other thread
    switches (or, for a tokenizer without a shared switch, by its own literal call), unless it
    is the bos or eos and an added special token. Where no such reading exists (a Rust pipeline
    that cannot be copied) none is.
    """
    return _special_ids(tokenizer)[1]


#: tokenizer -> (what the sets were found from; (control ids, unknown token included; ordinary ids))
_SPECIAL_IDS: "weakref.WeakKeyDictionary[Any, tuple[tuple, tuple[frozenset[int], frozenset[int]]]]" = (
    weakref.WeakKeyDictionary())


def _special_ids(tokenizer: Any) -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
    """(control ids, unknown token included; ordinary ids; the control ids that literal text
    still reaches through the vocabulary) among the ids of ``tokenizer``'s added tokens marked
    special and of its special-token attributes (see :func:`control_token_ids`); found again
    when any of those, the tokenizer's size or its Rust tokenizer change."""
    added = {int(i): t for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    named = tuple(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None)
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    made_from = (id(getattr(tokenizer, "_tokenizer", None)), size,
                 tuple((i, getattr(t, "content", None), bool(getattr(t, "special", False))) for i, t in added.items()),
                 named)
    try:
        known = _SPECIAL_IDS.get(tokenizer)
    except TypeError:  # cannot be weakly referenced: found on every call
        known = None
    if known is not None and known[0] == made_from:
        return known[1]
    special = {i for i, t in added.items() if getattr(t, "special", False)} | set(named)
    # bos and eos that are special tokens of the tokenizer count even where literal text gives
    # them (a Unigram vocabulary holds "</s>" as a piece): literal_ids spells them out (respell)
    ends = {getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id")}
    never = {i for i in ends if isinstance(i, int) and getattr(added.get(i), "special", False)}
    reached = _literal_gives(tokenizer, set(never), added) if never else set()
    never |= special - _literal_gives(tokenizer, special - never, added)
    found = (frozenset(never), frozenset(special - never), frozenset(reached))
    try:
        _SPECIAL_IDS[tokenizer] = (made_from, found)
    except TypeError:
        pass
    return found


def _literal_gives(tokenizer: Any, ids: set[int], added: dict[int, Any]) -> set[int]:
    """Which of ``ids`` literal tokenisation gives from their own spellings (each alone and after
    a letter): the added token's text and the decoded id. Read so that no other thread's usual
    call can make literal text look like a special token: a private copy of the Rust tokenizer,
    or the tokenizer's own literal call where it has no shared switch; none where neither exists."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        own = _private_copy(tokenizer, backend)
        if own is None:
            return set()

        def encode(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in own.encode_batch(texts, add_special_tokens=False)]
    elif hasattr(backend, "encode_special_tokens"):
        return set()
    else:  # a slow tokenizer takes the literal reading as an argument of each call

        def encode(texts: list[str]) -> list[list[int]]:
            return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    probes: list[tuple[int, str]] = []
    for i in sorted(ids):
        spellings = {getattr(added.get(i), "content", None)}
        try:
            spellings.add(tokenizer.decode([i]))
        except Exception:  # an id the tokenizer cannot decode: its added spelling alone
            pass
        for s in sorted(x for x in spellings if isinstance(x, str) and x):
            probes += [(i, s), (i, "a" + s)]
    if not probes:
        return set()
    try:
        read = encode([p for _, p in probes])
    except Exception:  # a tokenizer that cannot read them so: none is ordinary
        return set()
    return {i for (i, _), got in zip(probes, read) if i in got}
