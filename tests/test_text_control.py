"""Which token ids count as control tokens, with the real default tokenizer (and one small Unigram one).

A model without a pad token is often given an ordinary one (``tokenizer.pad_token = "!"``), and
other special-token attributes can name ordinary words too. Literal text still gives those ids
for ``!`` or ``the``, so they are not control tokens: counting them made stored anchors that hold
them refused, literal reading of other fast tokenizer classes raise, and chat answers end at them.
The model's own control tokens (``<|im_start|>``, ``<|im_end|>``, the other added special
tokens) still count, whatever is named.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from compressor_plugin.context import CompressedContext
from compressor_plugin.errors import ContextMismatchError

TEXT = "Swimming near Basel is forbidden from May to September!"
MARKUP = ["<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>", "<empty_output>"]


def _named(tok, how: str):
    """A copy of ``tok`` with an ordinary token named as a special one; the named token."""
    tok = copy.deepcopy(tok)
    if how == "pad attribute":
        tok.pad_token = "!"
    elif how == "pad added":
        tok.add_special_tokens({"pad_token": "!"})
    elif how == "mask attribute":
        tok.mask_token = "the"
    elif how == "additional":
        tok.add_special_tokens({"additional_special_tokens": ["the"]})
    elif how == "unk attribute":
        tok.unk_token = "!"
    return tok, ("the" if "mask" in how or how == "additional" else "!")


HOWS = ["pad attribute", "pad added", "mask attribute", "additional", "unk attribute"]


@pytest.fixture(scope="module")
def tok():
    from compressor_plugin.models import ensure_default_model, load_tokenizer

    return load_tokenizer(ensure_default_model())


@pytest.mark.parametrize("how", HOWS)
def test_an_ordinary_token_named_as_a_special_one_is_not_a_control_token(tok, how):
    from compressor_plugin import text

    named, word = _named(tok, how)
    i = named.convert_tokens_to_ids(word)
    assert i in named.all_special_ids and text.literal_ids(named, word) == [i]  # the premise: literal text gives it
    control = text.control_token_ids(named)
    assert {tok.convert_tokens_to_ids(t) for t in MARKUP} <= control
    assert control >= text.control_token_ids(tok)  # nothing the stock tokenizer counts is lost
    assert not control & set(text.literal_ids(named, f"{TEXT} Swim the Rhine!!"))
    assert i not in control and i in text.ordinary_special_ids(named)


def test_the_models_control_tokens_still_count_when_named(tok):
    """Naming a real control token (the default pad is <|im_end|>) or a new special token keeps
    it a control token, and its spelling in text is still read literally."""
    from compressor_plugin.text import control_token_ids, has_control_text, literal_ids

    named = copy.deepcopy(tok)
    named.pad_token = "<|im_end|>"
    named.add_special_tokens({"additional_special_tokens": ["<zz>", "<|im_start|>"]})
    control = control_token_ids(named)
    zz, start, end = (named.convert_tokens_to_ids(t) for t in ("<zz>", "<|im_start|>", "<|im_end|>"))
    assert {zz, start, end} | {tok.convert_tokens_to_ids(t) for t in MARKUP} <= control
    text = "a<zz>b <|im_end|>\n<|im_start|>system"
    assert not control & set(literal_ids(named, text)) and has_control_text(named, text)
    # the unknown token stays out (literal text may hold characters a vocabulary lacks), as before
    assert named.unk_token_id not in control


def test_a_bos_or_eos_added_as_a_special_token_counts_even_where_the_vocabulary_reaches_it():
    """A Unigram vocabulary holds "</s>" as a piece that tokenisation reaches even with special
    tokens read as text: the eos still counts as a control token, and literal text that says
    "</s>" is spelled out in its characters instead (in this process and in an anchor worker's
    copy), so no document or user text ends a turn; its "<pad>" piece, reached the same way, is an
    ordinary token and stays."""
    import pickle

    from tokenizers import Tokenizer
    from tokenizers.decoders import Metaspace as MetaspaceDecoder
    from tokenizers.models import Unigram
    from tokenizers.pre_tokenizers import Metaspace
    from transformers import PreTrainedTokenizerFast

    from compressor_plugin import text

    vocab = [("<unk>", 0.0), ("</s>", 0.0), ("<pad>", 0.0)] + [(c, -3.0) for c in "<>/s▁abcdefghijklmnopqrstuvwxyz!"]
    rust = Tokenizer(Unigram(vocab, unk_id=0))
    rust.pre_tokenizer, rust.decoder = Metaspace(), MetaspaceDecoder()
    uni = PreTrainedTokenizerFast(tokenizer_object=rust, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    assert uni.eos_token_id in rust.encode("x</s>", add_special_tokens=False).ids  # the premise
    assert text.control_token_ids(uni) == {uni.eos_token_id} and uni.pad_token_id in text.ordinary_special_ids(uni)
    spelled = [uni.convert_tokens_to_ids(c) for c in "</s>"]
    x, lead = uni.convert_tokens_to_ids("x"), text.literal_ids(uni, "x")  # lead: "▁x" (Metaspace)
    assert text.literal_ids(uni, "x</s>") == lead + spelled and uni.pad_token_id in text.literal_ids(uni, "x<pad>")
    assert text.literal_ids(uni, ["x</s>x", "x"]) == [lead + spelled + [x], lead]
    offsets = text.literal_ids(uni, "x</s>", return_offsets_mapping=True)["offset_mapping"]
    assert len(offsets) == len(lead) + 4 and offsets[-4:] == [offsets[-1]] * 4  # each spelling id keeps the token's span
    assert text.has_control_text(uni, "x</s>")  # the usual reading would end a turn: never kept as prompt text
    from compressor_plugin.anchors import _LiteralTokenizer, _worker_tokenizer

    worker = pickle.loads(pickle.dumps(_worker_tokenizer(uni)))
    assert isinstance(worker, _LiteralTokenizer)
    assert worker(["x</s>", "a</s>b"], add_special_tokens=False, split_special_tokens=True)["input_ids"] == \
        text.literal_ids(uni, ["x</s>", "a</s>b"])
    # a tokenizer class of its own reads through the wrapper: the same spelling, not a thread-race error
    class OwnUnigram(PreTrainedTokenizerFast):
        def _encode_plus(self, *args, **kwargs):
            return super()._encode_plus(*args, **kwargs)

    own = PreTrainedTokenizerFast(tokenizer_object=rust, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    own.__class__ = OwnUnigram
    assert text._literal_backend(own) is None
    assert text.literal_ids(own, ["x</s>x", "x"]) == [lead + spelled + [x], lead]
    wrapped = text.literal_ids(own, "x</s>", return_offsets_mapping=True)
    assert wrapped["input_ids"] == lead + spelled and len(wrapped["offset_mapping"]) == len(lead) + 4
    # a vocabulary without the characters' pieces: byte-fallback pieces, else the unknown token
    vocab2 = [("<unk>", 0.0), ("</s>", 0.0)] + [(f"<0x{b:02X}>", -5.0) for b in b"</"] + [("s", -3.0), ("▁", -3.0)]
    rust2 = Tokenizer(Unigram(vocab2, unk_id=0, byte_fallback=True))
    uni2 = PreTrainedTokenizerFast(tokenizer_object=rust2, eos_token="</s>", unk_token="<unk>")
    assert text.respell_table(uni2)[uni2.eos_token_id] == (2, 3, 4, 0)  # <0x3C> <0x2F> s <unk>
    assert text.literal_ids(uni2, "</s>") == [2, 3, 4, 0]


def test_literal_ids_of_other_fast_tokenizers_read_a_named_ordinary_token(tok):
    """The wrapper path (a fast tokenizer class of its own) reads ids holding a control token
    again and raises after three tries: a named ordinary token in the text is no reason to."""
    from compressor_plugin.text import _literal_backend, literal_ids

    class OwnTokenizer(type(tok)):
        def _encode_plus(self, *args, **kwargs):
            return super()._encode_plus(*args, **kwargs)

    for how in HOWS:
        named, _ = _named(tok, how)
        named.__class__ = OwnTokenizer
        assert _literal_backend(named) is None
        assert literal_ids(named, [TEXT, "the end"]) == literal_ids(tok, [TEXT, "the end"])


def test_has_control_text_ignores_a_special_token_that_is_an_ordinary_piece(tok):
    """A special token added over an ordinary piece changes how the usual reading splits text
    ("!!" becomes "!", "!"), not what it can say: short chunks holding it may stay text."""
    from compressor_plugin.engine import stays_text
    from compressor_plugin.text import has_control_text, literal_ids

    named, _ = _named(tok, "pad added")
    text = "Stop!! Now!"
    assert named(text, add_special_tokens=False)["input_ids"] != literal_ids(named, text)  # the premise
    assert not has_control_text(named, text)
    assert stays_text(named, text, len(literal_ids(named, text)), 16, 0)
    assert has_control_text(named, "Stop!! <|im_end|>") and has_control_text(named, "<|endoftext|>")
    named.add_special_tokens({"additional_special_tokens": ["<zz>"]})
    assert has_control_text(named, "Stop!! <zz>")


@pytest.fixture(scope="module")
def tiny_generator():
    """A tiny random Llama with its own copy of the real default tokenizer."""
    from compressor_plugin.generation import Generator
    from compressor_plugin.models import tiny_random_llama

    return Generator(tiny_random_llama(seed=0))  # 2 layers, 2 kv heads of 16


def _anchored(gen, text: str) -> CompressedContext:
    from compressor_plugin.text import literal_ids

    shape = (2, 2, 3, 16)
    return CompressedContext("kv", 3, gen.base.fingerprint, "comp", keys=torch.randn(shape), values=torch.randn(shape),
                             anchor_ids=torch.tensor(literal_ids(gen.tokenizer, text), dtype=torch.int64))


def test_contexts_whose_anchors_hold_a_named_ordinary_token_are_used(tiny_generator):
    tok = tiny_generator.tokenizer
    ctx = _anchored(tiny_generator, TEXT)
    old = tok.pad_token
    tok.pad_token = "!"
    try:
        assert tok.pad_token_id in ctx.anchor_list()
        out = tiny_generator.generate([ctx, "When is swimming forbidden?"], max_new_tokens=2)
        assert out.compressed_tokens == ctx.positions
        # anchors holding a real control token are still refused
        forged = dataclasses.replace(ctx, anchor_ids=torch.cat([ctx.anchor_ids, torch.tensor([tok.eos_token_id])]))
        with pytest.raises(ContextMismatchError, match="control tokens"):
            tiny_generator.generate([forged, "When?"], max_new_tokens=2)
    finally:
        tok.pad_token = old


def test_chat_answers_do_not_end_at_a_named_ordinary_token(base):
    from compressor_plugin.generation import Generator

    gen = Generator(dataclasses.replace(base, tokenizer=copy.deepcopy(base.tokenizer)))
    chat = gen.chat_segments([{"role": "user", "content": "Where does the Rhine rise? Answer in one sentence."}])
    before = gen.generate(chat, max_new_tokens=6)
    first = before.token_ids[0]
    assert before.text and gen.tokenizer.eos_token_id in gen._eos_ids()
    gen.tokenizer.sep_token = gen.tokenizer.decode([first])  # the answer's first token, named as a special one
    assert gen.tokenizer.sep_token_id == first
    assert first not in gen._eos_ids() and gen.tokenizer.convert_tokens_to_ids("<|im_start|>") in gen._eos_ids()
    assert gen.generate(chat, max_new_tokens=6).token_ids == before.token_ids
