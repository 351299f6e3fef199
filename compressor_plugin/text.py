"""Checks on input text shared by the compressor and the generator."""

from __future__ import annotations


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
