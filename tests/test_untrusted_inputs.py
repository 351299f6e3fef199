"""Files and bytes from outside, other than checkpoints and the store folder: each test feeds one
crafted input and checks it gives the documented error (or is skipped), never a crash of another
type, a hang or a silently wrong result."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from compressor_plugin.context import CompressedContext
from compressor_plugin.errors import ContextFormatError, ContextMismatchError, DataError

DEEP = "[" * 100_000 + "]" * 100_000


def with_meta(ctx: CompressedContext, **changes: str) -> bytes:
    """``ctx``'s bytes with header metadata fields replaced (tensor digest still valid)."""
    data = ctx.to_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    return st_save(st_load(data), metadata={**header["__metadata__"], **changes})


def small_ctx() -> CompressedContext:
    return CompressedContext("kv", 3, "base", "comp", keys=torch.randn(2, 2, 4, 16), values=torch.randn(2, 2, 4, 16))


@pytest.mark.parametrize("extra", [DEEP, '["a"]', '{"a": 1}', '{"a": {"b": "c"}}'])
def test_context_bytes_with_a_crafted_extra_raise_context_format_error(extra):
    with pytest.raises(ContextFormatError, match="extra"):
        CompressedContext.from_bytes(with_meta(small_ctx(), extra=extra))


@pytest.fixture(scope="module")
def tiny_generator():
    from compressor_plugin.generation import Generator
    from compressor_plugin.models import tiny_random_llama

    return Generator(tiny_random_llama(seed=0))  # 2 layers, 2 kv heads of 16, hidden 64


@pytest.mark.parametrize("shape", [(2, 1, 4, 16), (2, 4, 4, 16), (2, 2, 4, 8), (2, 2, 4, 32)])
def test_kv_context_of_another_shape_is_a_context_mismatch(tiny_generator, shape):
    fp = tiny_generator.base.fingerprint
    ctx = CompressedContext("kv", 3, fp, "comp", keys=torch.randn(shape), values=torch.randn(shape))
    with pytest.raises(ContextMismatchError, match="shape"):
        tiny_generator.generate([ctx, "Question?"], max_new_tokens=2)


@pytest.mark.parametrize("hidden", [1, 32, 128])
def test_embedding_context_of_another_width_is_a_context_mismatch(tiny_generator, hidden):
    # a width of 1 used to be broadcast over the whole hidden size without any error
    ctx = CompressedContext("embedding", 3, tiny_generator.base.fingerprint, "comp", embeddings=torch.randn(4, hidden))
    with pytest.raises(ContextMismatchError, match="shape"):
        tiny_generator.generate([ctx, "Question?"], max_new_tokens=2)


def test_deeply_nested_json_line_in_an_evaluation_file_is_a_data_error(tmp_path):
    from compressor_plugin.evaluation.data import read_jsonl

    p = tmp_path / "qa.jsonl"
    p.write_text('{"context": "c", "question": "q", "answers": ["a"]}\n' + DEEP + "\n")
    with pytest.raises(DataError, match=r"qa\.jsonl:2"):
        read_jsonl(p)


def test_deeply_nested_json_line_in_training_data_is_a_value_error(tmp_path):
    from compressor_plugin.training.data import read_jsonl

    p = tmp_path / "train.jsonl"
    p.write_text('{"text": "t"}\n' + DEEP + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl:2"):
        read_jsonl(p)


def test_cache_build_input_skips_nested_json_fifos_and_devices(tmp_path):
    from compressor_plugin.caching.chunking import iter_documents

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "first"}\n' + DEEP + '\n{"text": "second"}\n')
    os.mkfifo(folder / "b.txt")  # reading it would block forever
    os.symlink("/dev/zero", folder / "c.txt")  # reading it would never end
    skipped: Counter = Counter()
    docs = [d.text for d in iter_documents(folder, skipped=skipped, follow_symlinks=True)]
    assert docs == ["first", "second"]
    assert skipped["bad_json"] == 1 and skipped["unreadable_file"] == 2
    skipped.clear()  # without follow_symlinks, the link to /dev/zero leads out of the folder
    assert [d.text for d in iter_documents(folder, skipped=skipped)] == ["first", "second"]
    assert skipped["unreadable_file"] == 1 and skipped["outside_input"] == 1


def test_cache_build_input_skips_symlinks_that_lead_out_of_the_folder(tmp_path):
    from compressor_plugin.caching.chunking import input_files, iter_documents

    (tmp_path / "id_rsa").write_text("SECRET KEY")
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("inside")
    os.symlink(tmp_path / "id_rsa", folder / "notes.txt")  # absolute, out of the folder
    os.symlink("../../id_rsa", folder / "sub" / "rel.md")  # relative, out of the folder
    os.symlink("../notes.txt", folder / "sub" / "chain.txt")  # a link in the folder to a link out of it
    os.symlink(tmp_path / "gone", folder / "dangling.txt")  # nothing there, but out of the folder
    os.symlink("../a.txt", folder / "sub" / "same.txt")  # stays in the folder: read
    os.symlink(tmp_path, folder / "up")  # a symlinked folder is never entered
    skipped: Counter = Counter()
    docs = {d.source: d.text for d in iter_documents(folder, skipped=skipped)}
    assert docs == {"a.txt": "inside", "sub/same.txt": "inside"}
    assert skipped == Counter(outside_input=4)
    assert len(input_files(folder)[1]) == 2
    skipped.clear()
    docs = {d.source: d.text for d in iter_documents(folder, skipped=skipped, follow_symlinks=True)}
    assert docs["notes.txt"] == docs["sub/rel.md"] == docs["sub/chain.txt"] == "SECRET KEY"
    assert skipped == Counter(unreadable_file=1)
    # a single file named as the input is read wherever it links to: the user chose it
    assert [d.text for d in iter_documents(folder / "notes.txt")] == ["SECRET KEY"]

