"""Offline cache building: chunking, bad inputs, chunk map, resume after SIGKILL, benchmark."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from compressor_plugin.caching import TokenChunker, benchmark, build_cache, read_chunk_map
from compressor_plugin.caching.chunking import Document, iter_documents
from compressor_plugin.cli import main
from compressor_plugin.compressor import Compressor, CompressorConfig
from compressor_plugin.models import load_base_model, tiny_random_llama
from compressor_plugin.store import ContextStore, normalize_text

REPO = Path(__file__).resolve().parents[1]
WORDS = ("signal river matrix protein galaxy harbor lattice engine forest crystal theory market voltage "
         "garden spectrum archive neuron glacier pattern vessel orbit canyon ledger beacon").split()


def sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + rng.choice([".", ".", "!", "?"])


def document(rng: random.Random, paragraphs: int, sentences: int = 4) -> str:
    return "\n\n".join(" ".join(sentence(rng, rng.randint(5, 12)) for _ in range(sentences))
                       for _ in range(paragraphs))


def write_corpus(folder: Path, seed: int = 0, n_jsonl: int = 8) -> Path:
    """A small corpus: a JSONL file, a markdown file and a long text file, all valid."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as fh:
        for i in range(n_jsonl):
            fh.write(json.dumps({"id": f"doc-{i}", "text": document(rng, rng.randint(1, 3))}) + "\n")
    (folder / "notes.md").write_text("# Notes\n\n" + document(rng, 2), encoding="utf-8")
    (folder / "long.txt").write_text(document(rng, 8, 5), encoding="utf-8")
    return folder


def save_tiny_checkpoint(folder: Path, k: int = 4, max_length: int = 128) -> Path:
    """An untrained compressor over a tiny random Llama saved as a model folder (a real checkpoint)."""
    tiny = tiny_random_llama(seed=3)
    base_dir = folder / "base"
    tiny.model.save_pretrained(base_dir)
    tiny.tokenizer.save_pretrained(base_dir)
    base = load_base_model(base_dir, device="cpu")
    comp = Compressor(base, CompressorConfig(k=k, lora_r=4, max_length=max_length, base_model=str(base_dir)))
    return comp.save_pretrained(folder / "ckpt")


def store_entries(directory: Path) -> dict[str, tuple]:
    """key -> (keys, values, source_tokens, text) of every entry."""
    out = {}
    with ContextStore(directory, size_limit=None) as st:
        for key in st.keys():
            ctx = st.get(key)
            assert ctx is not None, key
            out[key] = (ctx.keys, ctx.values, ctx.source_tokens, st.get_text(key))
    return out


def assert_same_entries(a: dict[str, tuple], b: dict[str, tuple]) -> None:
    """Same keys, texts and token counts; tensors equal up to float rounding of the batch shapes."""
    assert set(a) == set(b)
    for key in a:
        ka, va, na, ta = a[key]
        kb, vb, nb, tb = b[key]
        assert (na, ta) == (nb, tb)
        assert ka.shape == kb.shape and ka.dtype == kb.dtype
        assert torch.allclose(ka, kb, rtol=1e-4, atol=1e-4) and torch.allclose(va, vb, rtol=1e-4, atol=1e-4), key


def documents_by_id(folder: Path) -> dict[tuple, str]:
    return {(d.source, d.doc_id): d.text for d in iter_documents(folder)}


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_comp(tiny_ckpt) -> Compressor:
    return Compressor.from_pretrained(tiny_ckpt, device="cpu")


# ---------------------------------------------------------------------------------- chunking
def test_chunks_respect_the_limit_and_prefer_paragraph_and_sentence_ends(tiny_comp):
    rng = random.Random(1)
    text = document(rng, 12, 5)
    tok = tiny_comp.tokenizer
    n_doc = len(tok(text, add_special_tokens=False)["input_ids"])
    chunks = TokenChunker(tok, 100).split([Document("d", text, "d.txt")])
    assert len(chunks) >= n_doc // 100 + 1
    pos = 0
    for i, c in enumerate(chunks):
        assert c.index == i and 0 < c.n_tokens <= 100
        assert c.ids == tok(c.text, add_special_tokens=False)["input_ids"]
        assert normalize_text(text[c.start:c.end]) == c.text == text[c.start:c.end]
        assert text[pos:c.start].strip() == ""  # no text is lost between chunks
        pos = c.end
        assert c.text[-1] in ".!?" or c is chunks[-1]  # every cut is at a sentence end here
    assert text[pos:].strip() == ""
    paragraph_cuts = sum(text[c.end:c.end + 2] == "\n\n" for c in chunks[:-1])
    assert paragraph_cuts >= len(chunks) // 2, "paragraph breaks near the limit should be preferred"


def test_text_without_spaces_is_cut_hard_and_overlap_repeats_tokens(tiny_comp):
    tok = tiny_comp.tokenizer
    blob = "x7Q" * 400  # no word boundary anywhere
    chunks = TokenChunker(tok, 64).split([Document("b", blob, "b.txt")])
    assert len(chunks) > 1 and all(c.n_tokens <= 64 for c in chunks)
    assert "".join(blob[c.start:c.end] for c in chunks) == blob
    text = document(random.Random(2), 6)
    plain = TokenChunker(tok, 80).split([Document("d", text, "d")])
    over = TokenChunker(tok, 80, overlap=20).split([Document("d", text, "d")])
    assert len(over) > len(plain)
    assert all(b.start < a.end for a, b in zip(over, over[1:]))  # consecutive chunks share text
    assert all(c.n_tokens <= 80 for c in over)
    with pytest.raises(ValueError, match="overlap"):
        TokenChunker(tok, 80, overlap=80)


# ---------------------------------------------------------------------------------- bad input
def test_bad_inputs_are_skipped_and_counted(tmp_path, tiny_ckpt, capsys):
    src = write_corpus(tmp_path / "in", n_jsonl=3)
    with open(src / "docs.jsonl", "ab") as fh:
        fh.write(b"{not json\n")                                   # bad_json
        fh.write(b'{"id": "x", "text": "caf\xe9 latin-1"}\n')        # not_utf8
        fh.write(b'[1, 2]\n')                                      # not_a_json_object
        fh.write(b'{"id": "no-text", "title": "t"}\n')             # missing_text_field
        fh.write(b'{"id": "blank", "text": "  \\n "}\n')           # empty_document
        fh.write(b'{"id": "surrogate", "text": "half a pair: \\ud800 here"}\n')  # lone_surrogate
        fh.write(b"\n")                                            # blank line: ignored
        fh.write(b'{"id": "ctx", "context": "Falls back to the context field."}\n')
    (src / "latin1.txt").write_bytes("d\xe9j\xe0 vu".encode("latin-1"))   # not_utf8
    (src / "empty.md").write_text("   \n")                                 # empty_document
    (src / "image.png").write_bytes(b"\x89PNG")                            # unsupported_file
    (src / "dangling.txt").symlink_to(src / "missing")                    # unreadable_file
    store = tmp_path / "store"
    rc = main(["cache", "build", "--input", str(src), "--store", str(store), "--checkpoint", str(tiny_ckpt),
               "--chunk-tokens", "64", "--batch-size", "8", "--no-progress", "--json", "--anchors", "0"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["skipped"] == {"bad_json": 1, "empty_document": 2, "lone_surrogate": 1, "missing_text_field": 1,
                              "not_a_json_object": 1, "not_utf8": 2, "unreadable_file": 1, "unsupported_file": 1}
    assert out["skipped_total"] == 10
    assert out["documents"] == 3 + 1 + 2  # 3 JSONL + the "context" line, notes.md, long.txt
    # the one-sentence "context" document is not longer than k + 8 tokens: kept as text (the short-chunk rule)
    assert out["kept_as_text"] == 1 and 0 < out["text_tokens"] <= 4 + 8
    assert out["new"] + 1 == out["chunks"] > out["documents"] and out["store_entries"] == out["new"]
    assert out["compressed_tokens"] == 4 * out["new"] + out["text_tokens"]
    assert out["compression_ratio"] == pytest.approx(out["source_tokens"] / out["compressed_tokens"], rel=1e-3)


def test_links_out_of_the_input_folder_are_skipped_unless_asked(tmp_path, tiny_ckpt, capsys):
    (tmp_path / "id_rsa").write_text("SECRET KEY")
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("inside text")
    (src / "notes.txt").symlink_to(tmp_path / "id_rsa")
    args = ["cache", "build", "--input", str(src), "--checkpoint", str(tiny_ckpt), "--no-progress", "--json",
            "--anchors", "0", "--chunk-tokens", "32", "--compress-short"]

    def texts(store: Path) -> list[str]:
        return sorted(text for *_, text in store_entries(store).values())

    assert main(args + ["--store", str(tmp_path / "s1")]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == {"outside_input": 1}
    assert texts(tmp_path / "s1") == ["inside text"]
    assert main(args + ["--store", str(tmp_path / "s2"), "--follow-symlinks"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == {}
    assert texts(tmp_path / "s2") == ["SECRET KEY", "inside text"]


def test_missing_input_is_a_clear_error(tmp_path, tiny_ckpt, capsys):
    rc = main(["cache", "build", "--input", str(tmp_path / "nope"), "--store", str(tmp_path / "s"),
               "--checkpoint", str(tiny_ckpt), "--no-progress"])
    assert rc == 2 and "input not found" in capsys.readouterr().err
    rc = main(["cache", "build", "--input", str(tmp_path), "--store", str(tmp_path / "s"),
               "--checkpoint", str(tiny_ckpt), "--chunk-tokens", "129", "--no-progress"])
    assert rc == 2 and "max_length" in capsys.readouterr().err


def test_fused_kernels_on_the_cpu_are_a_clear_error_and_write_nothing(tmp_path, tiny_ckpt, capsys):
    src = write_corpus(tmp_path / "corpus")
    store = tmp_path / "s"
    rc = main(["cache", "build", "--input", str(src), "--store", str(store), "--checkpoint", str(tiny_ckpt),
               "--fused-kernels", "--no-progress"])
    assert rc != 0 and "CUDA only" in capsys.readouterr().err
    assert not store.exists() or not store_entries(store)
    rc = main(["cache", "build", "--input", str(src), "--store", str(store), "--checkpoint", str(tiny_ckpt),
               "--fused-kernels", "--ray", "--no-progress"])
    assert rc == 2 and "not used with --ray" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- map, idempotence
def test_chunk_map_matches_the_store_and_a_second_run_adds_nothing(tmp_path, tiny_ckpt, capsys):
    src = write_corpus(tmp_path / "in")
    store, cmap = tmp_path / "store", tmp_path / "map.jsonl"
    args = ["cache", "build", "--input", str(src), "--store", str(store), "--checkpoint", str(tiny_ckpt),
            "--chunk-tokens", "48", "--batch-size", "4", "--map", str(cmap), "--no-progress", "--json",
            "--compress-short"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    rows = read_chunk_map(cmap)
    assert len(rows) == first["chunks"] == first["map_rows"] and first["new"] == len({r["key"] for r in rows})
    docs = documents_by_id(src)
    with ContextStore(store, size_limit=None) as st:
        per_doc = Counter()
        for r in rows:
            ctx = st.get(r["key"])
            assert ctx is not None and ctx.source_tokens == r["n_tokens"] <= 48
            text = docs[(r["source"], r["doc_id"])]
            assert normalize_text(text[r["start"]:r["end"]]) == st.get_text(r["key"])
            assert r["chunk"] == per_doc[(r["source"], r["doc_id"])]
            per_doc[(r["source"], r["doc_id"])] += 1
        assert len(per_doc) == len(docs)
    before = store_entries(store)
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["new"] == 0 and second["already_stored"] == second["chunks"] == first["chunks"]
    assert second["map_rows"] == 0 and len(read_chunk_map(cmap)) == len(rows)
    after = store_entries(store)
    assert set(after) == set(before)
    assert all(torch.equal(after[k][0], before[k][0]) for k in before)


def test_build_cache_python_api_with_documents(tmp_path, tiny_comp):
    docs = [Document("a", "First document. It is short.", "mem"), Document("b", "Second one!", "mem"),
            Document("c", "First document. It is short.", "mem")]  # same text as "a": stored once
    summary = build_cache(docs, tmp_path / "s", tiny_comp, chunk_tokens=32, progress=False,
                          map_path=tmp_path / "m.jsonl", keep_short=False)
    assert (summary.documents, summary.chunks, summary.new, summary.already_stored) == (3, 3, 2, 1)
    assert summary.to_dict()["chunks_per_s"] > 0 and "chunks" in summary.format()
    rows = read_chunk_map(tmp_path / "m.jsonl")
    assert [r["doc_id"] for r in rows] == ["a", "b", "c"] and rows[0]["key"] == rows[2]["key"]


def test_chunk_map_writer_cuts_a_partial_line_and_skips_known_rows(tmp_path):
    from compressor_plugin.caching import ChunkMapWriter

    row = {"doc_id": "a", "chunk": 0, "start": 0, "end": 5, "n_tokens": 2, "key": "0" * 64, "source": "s", "line": 1}
    path = tmp_path / "map.jsonl"
    path.write_text(json.dumps(row) + "\n" + '{"doc_id": "a", "chunk": 1, "sta')  # killed mid-line
    with ChunkMapWriter(path) as mw:
        assert mw.existing_rows == 1
        assert mw.write([row, dict(row, chunk=1, start=6, end=9)]) == 1
    assert [json.loads(line)["chunk"] for line in path.read_text().splitlines()] == [0, 1]



@pytest.mark.parametrize("field, value", [("key", ["0" * 64]), ("key", {"a": 1}), ("doc_id", 7), ("source", 1.5),
                                          ("chunk", "0"), ("start", [0]), ("end", True), ("line", {"n": 1})])
def test_chunk_map_writer_refuses_a_row_of_the_wrong_types_without_touching_the_file(tmp_path, field, value):
    from compressor_plugin.caching import ChunkMapWriter

    row = {"doc_id": "a", "chunk": 0, "start": 0, "end": 5, "n_tokens": 2, "key": "0" * 64, "source": "s", "line": 1}
    path = tmp_path / "map.jsonl"
    content = (json.dumps(row) + "\n" + json.dumps({**row, "chunk": 1, "start": 6, "end": 9, field: value}) + "\n"
               + '{"doc_id": "a", "chunk": 2, "sta').encode()  # and a partial last line, which must stay
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"chunk map .*map\.jsonl, line 2: '{field}' is .*not an? (string|integer)"):
        ChunkMapWriter(path)
    assert path.read_bytes() == content  # neither cut nor rewritten


def test_short_chunks_stay_text_as_the_engine_keeps_them(tmp_path, tiny_comp):
    """The short-chunk rule of the engine's mark, in the offline build: a chunk not longer than
    k + anchors + margin is neither compressed nor stored; its map row holds its text."""
    from compressor_plugin.engine import CompressionEngine

    short_text, long_text = "Ledger beacon orbit.", document(random.Random(1), 1, 6)
    docs = [Document("short", short_text, "mem"), Document("long", long_text, "mem")]
    engine = CompressionEngine(tiny_comp, ContextStore(tmp_path / "engine"), anchors=8)
    assert engine.stays_text(short_text) and not engine.stays_text(long_text)
    cmap = tmp_path / "m.jsonl"
    summary = build_cache(docs, tmp_path / "s", tiny_comp, chunk_tokens=128, progress=False, map_path=cmap, anchors=8)
    assert (summary.chunks, summary.new, summary.kept_as_text, summary.already_stored) == (2, 1, 1, 0)
    rows = {r["doc_id"]: r for r in read_chunk_map(cmap)}
    assert rows["short"]["key"] is None and rows["short"]["text"] == short_text
    assert summary.text_tokens == rows["short"]["n_tokens"]
    assert "text" not in rows["long"] and rows["long"]["key"] in ContextStore(tmp_path / "s")
    assert len(ContextStore(tmp_path / "s")) == 1  # only the long chunk is stored
    # the prompt positions the summary counts: k + anchors for the long chunk, its own tokens for the short one
    assert summary.compressed_tokens == tiny_comp.k + summary.anchor_tokens + summary.text_tokens
    assert "kept as text 1" in summary.format()
    # the same chunk the engine's mark would have used: its marker for the long one, the text for the short one
    marks = engine.mark([short_text, long_text])
    assert marks[0] == short_text and engine.own_marker_keys(marks[1]) == [rows["long"]["key"]]
    again = build_cache(docs, tmp_path / "s", tiny_comp, chunk_tokens=128, progress=False, map_path=cmap, anchors=8)
    assert (again.new, again.kept_as_text, again.already_stored, again.map_rows) == (0, 1, 1, 0)
    every = build_cache(docs, tmp_path / "all", tiny_comp, chunk_tokens=128, progress=False, anchors=8,
                        keep_short=False)
    assert (every.new, every.kept_as_text) == (2, 0)


# ---------------------------------------------------------------------------------- SIGKILL + resume
def test_resume_after_sigkill_loses_nothing_and_repeats_nothing(tmp_path, monkeypatch):
    """A build killed mid-run, run again, compresses exactly the chunks that were missing."""
    ckpt = Compressor(load_base_model(device="cpu"), CompressorConfig(k=2)).save_pretrained(tmp_path / "ckpt")
    src = write_corpus(tmp_path / "in", seed=5, n_jsonl=6)
    killed, reference, cmap = tmp_path / "killed", tmp_path / "reference", tmp_path / "map.jsonl"
    cmd = [sys.executable, "-m", "compressor_plugin.cli", "cache", "build", "--input", str(src), "--store", str(killed),
           "--checkpoint", str(ckpt), "--chunk-tokens", "40", "--batch-size", "1", "--map", str(cmap), "--no-progress",
           "--compress-short"]
    env = dict(cli_env(), OMP_NUM_THREADS="1")  # one thread: steady progress on a busy machine
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stored_at_kill = 0
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (killed / "store.json").exists():
                with ContextStore(killed, size_limit=None) as st:
                    stored_at_kill = len(st)
                if stored_at_kill >= 3:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, "the build ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = store_entries(killed)
    assert len(partial) >= 3

    comp = Compressor.from_pretrained(ckpt, device="cpu")
    rows_compressed: list[int] = []
    encode = comp.encode_ids

    def counting_encode_ids(batch):
        rows_compressed.append(len(batch))
        return encode(batch)

    monkeypatch.setattr(comp, "encode_ids", counting_encode_ids)
    summary = build_cache(src, killed, comp, chunk_tokens=40, batch_size=4, map_path=cmap, progress=False,
                          keep_short=False)
    resumed_rows = sum(rows_compressed)
    monkeypatch.undo()
    full = build_cache(src, reference, comp, chunk_tokens=40, batch_size=4, progress=False, keep_short=False)

    final, ref = store_entries(killed), store_entries(reference)
    assert len(ref) == full.new
    assert resumed_rows == summary.new == len(ref) - len(partial), "the resumed build recompressed stored chunks"
    assert set(partial) <= set(final)
    assert_same_entries(final, ref)
    for key in partial:  # what was stored before the kill was kept as it was
        assert torch.equal(partial[key][0], final[key][0])
    lines = cmap.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]  # no partial line left behind
    idents = [(r["source"], r["doc_id"], r["chunk"]) for r in rows]
    assert len(idents) == len(set(idents)) == full.chunks
    assert {r["key"] for r in rows} == set(ref)


# ---------------------------------------------------------------------------------- benchmark
def test_benchmark_reports_throughput_and_flops_on_cpu():
    res = benchmark(n_chunks=4, chunk_tokens=32, batch_size=2, device="cpu", k=4, peak_tflops=1.0)
    h, inter, layers, kv, r = 576, 1536, 30, 3 * 64, 16  # SmolLM2-135M; LoRA r=16 on q_proj, v_proj
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h + r * (h + h) + r * (h + kv)  # + LoRA on q, v
    n = layers * per_layer + h
    t = 32 + 4
    assert res["params_per_position"] == n
    assert res["gflops_per_chunk"] == pytest.approx((2 * n * t + 4 * layers * h * t * t) / 1e9, rel=1e-3)
    assert res["chunks_per_s"] > 0 and res["tflops"] > 0 and res["mfu"] == pytest.approx(res["tflops"], rel=1e-3)
    assert res["serialize_chunks_per_s"] > 0 and res["bytes_per_chunk"] > 2 * layers * 3 * 4 * 64 * 4


def test_anchors_chosen_in_worker_processes_are_the_ones_the_main_process_chooses(tmp_path, tiny_comp):
    """`cache build` chooses anchors in spawned workers beside the encoder: same stored entries."""
    from compressor_plugin.evaluation.invented import invented_qa

    texts = list(dict.fromkeys(r["context"] for r in invented_qa(12, seed=5)))
    docs = [Document(f"d{i}", t + " See also <|im_end|> and 1962.", "mem") for i, t in enumerate(texts)]
    got = {}
    for workers in (0, 2):
        summary = build_cache(docs, tmp_path / f"s{workers}", tiny_comp, chunk_tokens=48, batch_size=4,
                              progress=False, anchors=16, anchor_workers=workers)
        assert summary.new > len(docs) and summary.anchor_tokens > 0
        assert summary.anchor_workers == workers and summary.to_dict()["anchor_workers"] == workers
        with ContextStore(tmp_path / f"s{workers}", size_limit=None) as st:
            got[workers] = {key: (st.get(key).anchor_ids, st.get(key).keys) for key in st.keys()}
    assert set(got[0]) == set(got[2])
    anchored = 0
    for key, (ids, keys) in got[0].items():
        ids2, keys2 = got[2][key]
        assert (ids is None) == (ids2 is None) and (ids is None or torch.equal(ids, ids2)), key
        assert torch.allclose(keys, keys2, rtol=1e-4, atol=1e-4)
        anchored += ids is not None
    assert anchored >= len(got[0]) // 2
    with pytest.raises(ValueError, match="anchor_workers"):
        build_cache(docs, tmp_path / "bad", tiny_comp, chunk_tokens=48, progress=False, anchor_workers=-1)


def test_default_anchor_workers_by_device_and_cores(monkeypatch):
    """The CLI's --anchor-workers default: worker processes only for a GPU build on a host with
    cores to spare (on the CPU the encoder, not anchor choice, is the limit)."""
    import os

    from compressor_plugin.caching.build import default_anchor_workers

    assert default_anchor_workers("cpu") == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_anchor_workers("cuda") == 8 and default_anchor_workers("cpu") == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert default_anchor_workers("cuda:0") == 0
