"""Prompt layouts shared by training, evaluation and the LLM wrappers.

A layout turns contexts (text or compressed) plus a question into prompt segments for
:class:`~compressor_plugin.generation.Generator`, and an answer into the training target.
Training uses the same layouts, so a compressor learns for the prompts it will be read in.

Layouts:

* ``plain``: ``Context: <ctx>\\nQuestion: <q>\\nAnswer:`` (answer ends at a newline).
* ``fewshot``: three solved SQuAD training examples in the ``plain`` layout, then ``plain``.
  The prefix is fixed text, so it can be cached once; it never holds compressed tokens.
* ``chat``: the model's chat template; the user turn holds the contexts and the question.
* ``regen``: ``<ctx>\\nRepeat the text above:\\n`` and the text itself (regeneration).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from .context import CompressedContext

QA_LAYOUTS = ("plain", "fewshot", "chat")
REGEN_CUE = "\nRepeat the text above:\n"
CHAT_INSTRUCTION = "Answer the question using the context. Reply with a short phrase copied from the context."
FEWSHOT_FILE = Path(__file__).parent / "data" / "fewshot_squad.json"


@lru_cache(maxsize=1)
def fewshot_examples() -> list[dict[str, str]]:
    """The three fixed solved examples (SQuAD v1.1 train, CC BY-SA 4.0)."""
    return json.loads(FEWSHOT_FILE.read_text())["examples"]


def fewshot_prefix() -> str:
    """The few-shot prefix text (ends with a blank line)."""
    return "".join(f"Context: {e['context']}\nQuestion: {e['question']}\nAnswer: {e['answer']}\n\n"
                   for e in fewshot_examples())


@dataclass(frozen=True)
class QAPrompt:
    """A QA prompt split into the text before the contexts, the contexts, and the text after."""

    before: str
    after: str
    target_prefix: str
    target_suffix: str
    stop: tuple[str, ...]
    chat: bool = False

    def segments(self, contexts: Sequence[str | CompressedContext], sep: str = "\n") -> list[Any]:
        """Prompt segments: text contexts are joined by ``sep``; compressed ones sit back to back."""
        segs: list[Any] = [self.before]
        prev_text = False
        for c in contexts:
            if isinstance(c, str):
                if prev_text:
                    segs.append(sep)
                segs.append(c)
                prev_text = True
            else:
                segs.append(c)
                prev_text = False
        segs.append(self.after)
        return [s for s in segs if not (isinstance(s, str) and s == "")]

    def target(self, answer: str) -> str:
        """Training target for an answer (what the model should generate)."""
        return self.target_prefix + answer + self.target_suffix


def qa_prompt(layout: str, question: str, tokenizer: Any = None) -> QAPrompt:
    """Build the QA prompt of ``layout`` (one of :data:`QA_LAYOUTS`) for ``question``."""
    q = question.strip()
    if layout == "plain":
        return QAPrompt("Context: ", f"\nQuestion: {q}\nAnswer:", " ", "\n", ("\n",))
    if layout == "fewshot":
        return QAPrompt(fewshot_prefix() + "Context: ", f"\nQuestion: {q}\nAnswer:", " ", "\n", ("\n",))
    if layout == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("the chat layout needs a tokenizer with a chat template")
        marker = "\u27e6CONTEXT\u27e7"
        msgs = [{"role": "user", "content": f"{CHAT_INSTRUCTION}\n\nContext: {marker}\n\nQuestion: {q}"}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        before, after = text.split(marker)
        eos = tokenizer.eos_token or ""
        return QAPrompt(before, after, "", eos, ("\n",), chat=True)
    raise ValueError(f"unknown layout {layout!r}; choose from {QA_LAYOUTS}")


def regen_segments(context: str | CompressedContext) -> list[Any]:
    """Segments asking the decoder to regenerate a context."""
    return [context, REGEN_CUE]
