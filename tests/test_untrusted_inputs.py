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



def _swap_after_listing(folder: Path, swap, **kw):
    """Documents of ``folder`` read with ``swap()`` run after the folder was listed and its first
    file read (``build_cache`` lists the input up front, then reads it window by window)."""
    from compressor_plugin.caching.chunking import iter_documents

    skipped: Counter = Counter()
    docs = iter_documents(folder, skipped=skipped, **kw)
    first = next(docs)
    swap()
    return {d.source: d.text for d in [first, *docs]}, skipped


@pytest.mark.parametrize("proc", [True, False], ids=["proc", "no-proc"])
def test_cache_build_input_swapped_for_a_link_out_of_the_folder_after_listing_is_not_read(tmp_path, monkeypatch, proc):
    from compressor_plugin.caching import chunking

    if not proc:  # a system without /proc: the open file is compared with the path's real location
        monkeypatch.setattr(chunking, "_fd_path", lambda fd: None)
    (tmp_path / "id_rsa").write_text("SECRET KEY")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "c.txt").write_text("SECRET NOTES")
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first")
    (folder / "b.txt").write_text("second")
    (folder / "d.txt").write_text("fourth")
    (folder / "sub" / "c.txt").write_text("third")

    def swap():
        os.unlink(folder / "b.txt")  # the file itself becomes a link out of the folder
        os.symlink(tmp_path / "id_rsa", folder / "b.txt")
        os.rename(folder / "sub", tmp_path / "old-sub")  # a parent folder becomes a link out of it
        os.symlink(tmp_path / "elsewhere", folder / "sub")
        os.unlink(folder / "d.txt")  # a link that stays in the folder is read, as when listed
        os.symlink("a.txt", folder / "d.txt")

    docs, skipped = _swap_after_listing(folder, swap)
    assert docs == {"a.txt": "first", "d.txt": "first"}
    assert skipped == Counter(outside_input=2)
    # follow_symlinks reads where the links lead, as before
    folder = tmp_path / "docs2"
    folder.mkdir()
    (folder / "a.txt").write_text("first")
    (folder / "b.txt").write_text("second")

    def swap_b():
        os.unlink(folder / "b.txt")
        os.symlink(tmp_path / "id_rsa", folder / "b.txt")

    docs, skipped = _swap_after_listing(folder, swap_b, follow_symlinks=True)
    assert docs == {"a.txt": "first", "b.txt": "SECRET KEY"} and not skipped


def test_cache_build_input_swapped_for_a_fifo_after_the_check_does_not_block(tmp_path, monkeypatch):
    import threading

    from compressor_plugin.caching.chunking import iter_documents

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("first")
    os.mkfifo(folder / "b.txt")
    os.mkfifo(folder / "c.jsonl")
    is_file = Path.is_file
    # emulate the race: the check by path saw a regular file, the FIFO came just after it
    monkeypatch.setattr(Path, "is_file", lambda p: p.name in ("b.txt", "c.jsonl") or is_file(p))
    skipped: Counter = Counter()
    out: list = []
    reader = threading.Thread(target=lambda: out.extend(iter_documents(folder, skipped=skipped)), daemon=True)
    reader.start()
    reader.join(10)
    blocked = reader.is_alive()
    for name in ("b.txt", "c.jsonl"):  # release a reader blocked in open(), if any
        try:
            os.close(os.open(folder / name, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    assert not blocked, "the reader blocked on a FIFO"
    assert [d.text for d in out] == ["first"]
    assert skipped == Counter(unreadable_file=2)


def test_cache_build_input_skips_huge_files_and_lines_without_reading_them_whole(tmp_path):
    import tracemalloc

    from compressor_plugin.caching.chunking import MAX_JSONL_LINE_BYTES, MAX_TEXT_FILE_BYTES, iter_documents

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("first")
    with open(folder / "b.jsonl", "wb") as fh:  # a line 4x the limit between two good ones, sparse
        fh.write(b'{"text": "second"}\n')
        fh.seek(4 * MAX_JSONL_LINE_BYTES, os.SEEK_CUR)
        fh.write(b'\n{"text": "third"}\n')
    with open(folder / "c.jsonl", "wb") as fh:  # a last line over the limit, no newline after it
        fh.write(b'{"text": "fourth"}\n')
        fh.truncate(fh.tell() + MAX_JSONL_LINE_BYTES + 1)
    with open(folder / "d.txt", "wb") as fh:  # 1 TiB, sparse: read whole it raised MemoryError
        fh.truncate(2 ** 40)
    with open(folder / "e.md", "wb") as fh:  # one byte over the limit
        fh.truncate(MAX_TEXT_FILE_BYTES + 1)
    skipped: Counter = Counter()
    tracemalloc.start()
    try:
        docs = [(d.text, d.line) for d in iter_documents(folder, skipped=skipped)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert docs == [("first", None), ("second", 1), ("third", 3), ("fourth", 1)]
    assert skipped == Counter(too_large=4)
    assert peak < 3 * MAX_JSONL_LINE_BYTES, peak  # never a whole over-long line or file in memory


def test_checkpoint_max_length_beyond_the_model_positions_is_refused(tmp_path):
    # max_length is how long an untrusted document may be compressed in one encoder forward:
    # a crafted 10**12 turned the splitting of documents off
    from compressor_plugin.compressor import Compressor, CompressorConfig
    from compressor_plugin.errors import CheckpointMismatchError
    from compressor_plugin.models import tiny_random_llama

    base = tiny_random_llama(seed=1)  # max_position_embeddings 4096
    good = Compressor(base, CompressorConfig(k=4, lora_r=4, max_length=64)).save_pretrained(tmp_path / "ckpt")
    meta = json.loads((good / "config.json").read_text())
    for max_length, why in [(10 ** 12, "max_length"), (40_000, "max_length"), (4096, "max_position_embeddings")]:
        meta["config"]["max_length"] = max_length
        (good / "config.json").write_text(json.dumps(meta))
        with pytest.raises(CheckpointMismatchError, match=why):
            Compressor.from_pretrained(good, base=tiny_random_llama(seed=1))
    with pytest.raises(ValueError, match="max_length"):
        CompressorConfig(max_length=10 ** 12)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Compressor(tiny_random_llama(seed=1), CompressorConfig(k=4, lora_r=4, max_length=4093))
    meta["config"]["max_length"] = 4000  # 4000 + k=4 (+ a BOS) positions fit
    (good / "config.json").write_text(json.dumps(meta))
    assert Compressor.from_pretrained(good, base=tiny_random_llama(seed=1)).config.max_length == 4000
