"""End-to-end tests of ``compressor-plugin eval`` and ``compressor-plugin bench`` on CPU.

The commands run in-process on tiny JSONL files with the real default model and untrained
compressors (``--k``): the scores say nothing about quality, but the schema, the token
accounting and the arithmetic are checked exactly where they can be.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from compressor_plugin.cli import COMMAND_MODULES, main
from compressor_plugin.evaluation.data import is_label_task, load_qa, load_texts, seeded_indices

pytestmark = pytest.mark.slow

QA_ROWS = [
    {"id": "q1", "context": "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was completed in 1889 "
                            "for the World's Fair.",
     "question": "In what year was the Eiffel Tower completed?", "answers": ["1889"]},
    {"id": "q2", "context": "Mount Kilimanjaro is the highest mountain in Africa. It stands in Tanzania and rises "
                            "about 5,895 metres above sea level.",
     "question": "In which country is Mount Kilimanjaro?", "answers": ["Tanzania"]},
    {"id": "q3", "context": "Marie Curie was a physicist and chemist who did pioneering research on radioactivity. "
                            "She was the first woman to win a Nobel Prize.",
     "question": "What did Marie Curie research?", "answers": ["radioactivity", "pioneering research on radioactivity"]},
    {"id": "q4", "context": "The Danube flows through Vienna, Bratislava, Budapest and Belgrade before it reaches "
                            "the Black Sea.",
     "question": "Into which sea does the Danube flow?", "answers": ["the Black Sea", "Black Sea"]},
]

CORPUS_ROWS = [
    {"id": "t1", "text": "Compressed contexts let a language model read a long passage through a handful of "
                         "learned key and value vectors instead of hundreds of tokens."},
    {"id": "t2", "text": "The river was quiet in the morning. Fishermen pushed their boats into the water and "
                         "the gulls followed them out past the harbour wall."},
    {"id": "t3", "text": "A short note for the whole team: the weekly planning meeting moves to Thursday at ten, "
                         "in the small room."},
]

NUMERIC_QA = ("f1", "em", "retention_f1", "prompt_tokens_mean", "source_tokens_mean", "context_tokens_mean",
              "compression_ratio", "seconds")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(argv: list[str]) -> int:
    """Run the CLI in-process; model-loading commands are pinned to CPU (fp32) like the other tests."""
    argv = [str(a) for a in argv]
    if argv[:2] in (["eval", "qa"], ["eval", "regen"], ["bench", "rag"], ["bench", "compress"], ["bench", "disk"]):
        argv += ["--device", "cpu"]
    return main(argv)


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _jsonl(tmp_path_factory.mktemp("qa") / "tiny_qa.jsonl", QA_ROWS)


def _check_qa_system(name: str, s: dict, n: int) -> None:
    assert s["n"] == n, name
    for key in ("f1", "em"):
        assert 0.0 <= s[key] <= 1.0, (name, key, s[key])
    assert s["em"] <= s["f1"] + 1e-9, name  # an exact match always has F1 = 1
    assert s["prompt_tokens_mean"] > 0 and s["source_tokens_mean"] > 0, name
    assert s["seconds"] >= 0, name
    if s["retention_f1"] is not None:
        assert s["retention_f1"] >= 0
    for key in NUMERIC_QA:
        v = s.get(key)
        assert v is None or (isinstance(v, (int, float)) and math.isfinite(v)), (name, key, v)


def test_commands_registered() -> None:
    assert "compressor_plugin.commands.eval" in COMMAND_MODULES
    assert "compressor_plugin.commands.bench" in COMMAND_MODULES


def test_data_subset_and_distractors(qa_file: Path) -> None:
    a = load_qa(qa_file, limit=2, seed=3)
    b = load_qa(qa_file, limit=2, seed=3)
    assert [e.id for e in a] == [e.id for e in b] and len(a) == 2
    assert [e.id for e in a] == sorted([e.id for e in a], key=lambda i: int(i[1:]))  # file order
    assert seeded_indices(10, None, 0) == list(range(10))
    multi = load_qa(qa_file, limit=4, seed=1, chunks=3)
    for ex in multi:
        assert len(ex.contexts) == 3 and len(set(ex.contexts)) == 3
        assert ex.contexts[ex.gold_index] == ex.context
    assert [e.contexts for e in multi] == [e.contexts for e in load_qa(qa_file, limit=4, seed=1, chunks=3)]
    assert not is_label_task(multi)
    with pytest.raises(ValueError, match="distinct contexts"):
        load_qa(qa_file, chunks=5)


def test_eval_qa_end_to_end(qa_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "qa.json", tmp_path / "qa.png"
    rc = _run(["eval", "qa", "--data", qa_file, "--limit", 2, "--seed", 0, "--k", 4, "--mode", "kv",
               "--layouts", "plain,chat", "--batch-size", 2, "--max-new-tokens", 12, "--output", out, "--plot", png,
               "--no-progress"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| system | F1 | EM |" in table and "| kv-k4 |" in table
    r = json.loads(out.read_text())
    assert r["kind"] == "eval-qa" and r["n"] == 2 and r["seed"] == 0 and r["data"] == str(qa_file)
    systems = r["systems"]
    expected = {"full-plain", "full-chat", "full", "none", "truncate-k4", "kv-k4-plain", "kv-k4-chat", "kv-k4"}
    assert set(systems) == expected
    for name, s in systems.items():
        _check_qa_system(name, s, 2)
    cfg = r["config"]
    best = systems["full"]["layout"]
    assert best in ("plain", "chat") and cfg["best_layout"] == best
    assert systems["full"]["f1"] == systems[f"full-{best}"]["f1"] == max(systems["full-plain"]["f1"],
                                                                         systems["full-chat"]["f1"])
    assert systems["none"]["layout"] == best and systems["none"]["context_tokens_mean"] == 0
    assert systems["none"]["compression_ratio"] is None
    assert systems["none"]["prompt_tokens_mean"] < systems["full"]["prompt_tokens_mean"]
    # truncation keeps at most 4 tokens of context (re-tokenising the cut text can merge tokens)
    assert systems["truncate-k4"]["context_tokens_mean"] <= 4
    # a compressed context occupies exactly k positions; it stands for the whole context
    for lay in ("plain", "chat"):
        c, f = systems[f"kv-k4-{lay}"], systems[f"full-{lay}"]
        assert c["context_tokens_mean"] == 4
        assert c["source_tokens_mean"] == f["source_tokens_mean"]
        assert c["prompt_tokens_mean"] == pytest.approx(f["prompt_tokens_mean"] - f["source_tokens_mean"] + 4)
        assert c["compression_ratio"] == pytest.approx(c["source_tokens_mean"] / 4)
        assert c["untrained"] is True and c["k"] == 4 and c["mode"] == "kv"
    assert systems["kv-k4"]["f1"] == max(systems["kv-k4-plain"]["f1"], systems["kv-k4-chat"]["f1"])
    full_f1 = systems["full"]["f1"]
    for s in systems.values():
        assert s["retention_f1"] == (pytest.approx(s["f1"] / full_f1) if full_f1 > 0 else None)
    assert set(r["examples"]) == expected
    for ex in r["examples"].values():
        assert len(ex) == 2 and {"id", "question", "golds", "prediction", "f1", "em"} <= set(ex[0])
    assert [e["id"] for e in r["examples"]["full"]] == [e.id for e in load_qa(qa_file, limit=2, seed=0)]
    assert cfg["checkpoints"][0]["untrained"] is True and cfg["model"] == "SmolLM2-135M-Instruct"
    assert _is_png(png)


def test_eval_qa_question_anchors(qa_file: Path, tmp_path: Path) -> None:
    """--question-anchors: +qN (the engine's choice, budget shared across the prompt) and, with
    several chunks, +qN-unshared, beside +aN (anchors chosen once); the same positions at most."""
    out = tmp_path / "qa_q.json"
    rc = _run(["eval", "qa", "--data", qa_file, "--limit", 3, "--chunks", 2, "--k", 2, "--layouts", "plain",
               "--systems", "compressed", "--anchors", "0,8", "--question-anchors", "--window-shares", "0,0.5",
               "--batch-size", 3, "--max-new-tokens", 4, "--output", out, "--no-progress"])
    assert rc == 0
    r = json.loads(out.read_text())
    systems = r["systems"]
    assert set(systems) == {"kv-k2", "kv-k2+a8", "kv-k2+q8", "kv-k2+q8-unshared", "kv-k2+q8w50",
                            "kv-k2+q8w50-unshared"}
    assert r["config"]["question_anchors"] is True and r["config"]["window_shares"] == [0.0, 0.5]
    assert systems["kv-k2+q8"]["question_anchors"] == "shared"
    assert systems["kv-k2+q8-unshared"]["question_anchors"] == "each"
    assert systems["kv-k2+a8"]["question_anchors"] is False
    assert systems["kv-k2+q8w50"]["window_share"] == 0.5 and systems["kv-k2+q8"]["window_share"] == 0.0
    for name in ("kv-k2+a8", "kv-k2+q8", "kv-k2+q8-unshared", "kv-k2+q8w50", "kv-k2+q8w50-unshared"):
        # two chunks of 2 slots and at most 8 anchor tokens each (shared: at most 16 in all)
        assert 4 < systems[name]["context_tokens_mean"] <= 4 + 16, name


def test_eval_qa_chunks_checkpoint_and_full_tuned(qa_file: Path, tmp_path: Path) -> None:
    """Multi-chunk prompts, a saved checkpoint folder, and a LoRA adapter folder as full-tuned."""
    from peft import LoraConfig, get_peft_model

    from compressor_plugin.compressor import Compressor, CompressorConfig
    from compressor_plugin.models import load_base_model

    ckpt = tmp_path / "ckpt"
    Compressor(load_base_model(device="cpu"), CompressorConfig(k=2, mode="embedding")).save_pretrained(
        ckpt, extra={"stage": "qa", "layouts": ["plain", "chat"]})
    adapter = tmp_path / "adapter"
    base = load_base_model(device="cpu")
    # default LoRA init (B = 0): the tuned model must answer exactly like the base model
    get_peft_model(base.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    (adapter / "train_info.json").write_text(json.dumps({"stage": "qa", "layouts": ["fewshot", "plain"]}))
    del base
    out = tmp_path / "qa3.json"
    # --layouts plain: both trained systems are evaluated in the one layout they share with it
    rc = _run(["eval", "qa", "--data", qa_file, "--limit", 2, "--seed", 1, "--chunks", 3, "--checkpoint", ckpt,
               "--layouts", "plain", "--full-tuned", adapter, "--batch-size", 2, "--max-new-tokens", 12,
               "--output", out, "--no-progress"])
    assert rc == 0
    r = json.loads(out.read_text())
    systems = r["systems"]
    assert set(systems) == {"full-plain", "full", "none", "truncate-k2", "embedding-k2", "full-tuned"}
    meta = r["config"]["checkpoints"][0]
    assert meta["path"] == str(ckpt) and meta["untrained"] is False and meta["trained_layouts"] == ["plain", "chat"]
    assert systems["embedding-k2"]["layout"] == "plain" and systems["embedding-k2"]["checkpoint"] == str(ckpt)
    for name, s in systems.items():
        _check_qa_system(name, s, 2)
    assert r["config"]["chunks"] == 3
    # three compressed contexts back to back: 3 * k positions
    assert systems["embedding-k2"]["context_tokens_mean"] == 6
    assert systems["truncate-k2"]["context_tokens_mean"] <= 6
    assert systems["full"]["source_tokens_mean"] > 3 * 15
    ft = systems["full-tuned"]
    assert ft["layout"] == "plain" and ft["adapter"] == str(adapter)
    assert [e["prediction"] for e in r["examples"]["full-tuned"]] == \
        [e["prediction"] for e in r["examples"]["full-plain"]]
    assert ft["prompt_tokens_mean"] == systems["full-plain"]["prompt_tokens_mean"]


def test_recorded_layouts() -> None:
    from compressor_plugin.evaluation.qa import _eval_layouts, recorded_layouts

    assert recorded_layouts({"layout": "chat"}) == ["chat"]
    assert recorded_layouts({"layouts": ["plain", "bogus", "fewshot"]}) == ["plain", "fewshot"]
    assert recorded_layouts({"layouts": ["bogus"]}) is None and recorded_layouts(None) is None
    assert _eval_layouts(None, ["plain", "chat"]) == ["plain", "chat"]
    assert _eval_layouts(["fewshot", "chat"], ["chat"]) == ["chat"]
    assert _eval_layouts(["fewshot"], ["plain", "chat"]) == ["fewshot"]  # the trained layout wins


def test_full_tuned_adapter_is_enabled(tmp_path: Path, generator) -> None:
    """A non-zero LoRA adapter must change the logits: the generator runs with it enabled."""
    import torch
    from peft import LoraConfig, get_peft_model

    from compressor_plugin.evaluation.qa import load_full_tuned
    from compressor_plugin.models import load_base_model

    plain = generator.prefill(["The capital of France is"]).last_logits
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(load_base_model(device="cpu").model, cfg).save_pretrained(tmp_path / "adapter")
    tuned = load_full_tuned(tmp_path / "adapter", device="cpu").prefill(["The capital of France is"]).last_logits
    assert not torch.allclose(plain, tuned, atol=1e-3)


def test_eval_regen_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _jsonl(tmp_path / "corpus.jsonl", CORPUS_ROWS)
    out = tmp_path / "regen.json"
    # --max-tokens 16 cuts the texts (~30 tokens) to keep decoding short
    rc = _run(["eval", "regen", "--data", data, "--limit", 2, "--k", 4, "--max-tokens", 16, "--batch-size", 2,
               "--output", out, "--no-progress"])
    assert rc == 0
    assert "| system | ROUGE-L F | BLEU |" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["kind"] == "eval-regen" and r["n"] == 2
    assert set(r["systems"]) == {"full-kv", "kv-k4"}
    picked = {t for _, t in load_texts(data, limit=2, seed=0)}
    assert r["config"]["texts_cut"] == 2
    for name, s in r["systems"].items():
        assert s["n"] == 2
        for key in ("rouge_l", "rouge_l_precision", "rouge_l_recall", "bleu", "exact_match"):
            assert 0.0 <= s[key] <= 1.0, (name, key)
        assert sum(b["n"] for b in s["by_length"].values()) == 2
        assert set(s["by_length"]) <= {"<=96", "<=192", "<=288", "<=384", "<=512", ">512"}
        # at most source + 16 new tokens per text
        assert 0 <= s["generated_tokens_mean"] <= s["source_tokens_mean"] + 16
        assert s["source_tokens_mean"] <= 16
        refs = [e["reference"] for e in r["examples"][name]]
        assert len(refs) == 2 and all(any(t.startswith(ref[:20]) for t in picked) for ref in refs)
    full, comp = r["systems"]["full-kv"], r["systems"]["kv-k4"]
    assert full["context_tokens_mean"] == full["source_tokens_mean"]  # the exact K/V: one position per token
    assert comp["context_tokens_mean"] == 4
    # prompt = context positions + the regeneration cue
    assert full["prompt_tokens_mean"] - full["source_tokens_mean"] == comp["prompt_tokens_mean"] - 4


def test_bench_rag_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "rag.json", tmp_path / "rag.png"
    rc = _run(["bench", "rag", "--n", 1, "--tokens", 64, "--repeats", 1, "--k", 4, "--max-new-tokens", 4,
               "--output", out, "--plot", png, "--no-progress"])
    assert rc == 0
    assert "| n | T | system |" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["kind"] == "bench-rag"
    rows = {row["system"]: row for row in r["rows"]}
    assert set(rows) == {"full", "store-hit", "store-miss", "engine-hit"}
    for name, row in rows.items():
        assert row["n_chunks"] == 1 and row["chunk_tokens"] == 64
        assert 0 < row["ttft_s_median"] <= row["e2e_s_median"], name
        assert 0 <= row["new_tokens_mean"] <= 4
        assert row["peak_mem_bytes"] > 100 * 2**20  # the model alone is ~540 MB in fp32
        assert abs(row["source_tokens"] - 64) <= 2
    assert rows["store-hit"]["prompt_tokens"] == rows["store-miss"]["prompt_tokens"]
    assert rows["full"]["prompt_tokens"] - rows["store-hit"]["prompt_tokens"] == rows["full"]["source_tokens"] - 4
    assert rows["store-hit"]["lookup_s_median"] > 0 and rows["store-miss"]["compress_s_median"] > 0
    # the engine's path (markers resolved from the store) lays out the same prompt
    assert rows["engine-hit"]["prompt_tokens"] == rows["store-hit"]["prompt_tokens"]
    assert 0 < rows["engine-hit"]["resolve_s_median"] < rows["engine-hit"]["ttft_s_median"]
    assert rows["full"]["ttft_speedup_vs_full"] == 1.0
    assert "ru_maxrss" in r["config"]["memory_note"]
    assert _is_png(png)
    plot2 = tmp_path / "replot.png"
    assert _run(["eval", "plot", out, "--output", plot2]) == 0 and _is_png(plot2)



def test_bench_rag_with_anchors_counts_them_as_prompt_tokens(tmp_path: Path) -> None:
    """--anchors: each stored chunk brings up to N anchor tokens, read (and timed) with the prompt."""
    out = tmp_path / "rag.json"
    data = Path(__file__).parent / "fixtures" / "docs_small.jsonl"  # Wikipedia paragraphs: names and dates
    assert _run(["bench", "rag", "--n", 1, "--tokens", 64, "--repeats", 1, "--k", 4, "--max-new-tokens", 2,
                 "--anchors", 8, "--data", data, "--output", out, "--no-progress", "--static-prefill"]) == 0
    r = json.loads(out.read_text())
    rows = {row["system"]: row for row in r["rows"]}
    assert r["config"]["anchors"] == 8 and r["config"]["static_prefill"] is True
    extra = rows["full"]["source_tokens"] - 4 - (rows["full"]["prompt_tokens"] - rows["store-hit"]["prompt_tokens"])
    assert 0 < extra <= 8  # the anchor tokens beside the 4 slots
    assert rows["store-hit"]["prompt_tokens"] == rows["store-miss"]["prompt_tokens"]
    # the engine chooses the anchors for the question, within the same budget
    assert r["config"]["question_anchors"] is True
    engine_extra = rows["full"]["source_tokens"] - 4 - (rows["full"]["prompt_tokens"] - rows["engine-hit"]["prompt_tokens"])
    assert 0 < engine_extra <= 8

def test_bench_compress_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "compress.json"
    rc = _run(["bench", "compress", "--batch-sizes", "1,2", "--tokens", 32, "--k", 4, "--repeats", 1,
               "--peak-tflops", 2.0, "--merge-lora", "--output", out, "--no-progress"])
    assert rc == 0
    r = json.loads(out.read_text())
    cfg = r["config"]
    assert cfg["merge_lora"] is True
    assert r["kind"] == "bench-compress" and [row["batch_size"] for row in r["rows"]] == [1, 2]
    # SmolLM2-135M: ~106 M parameters in the layers (no embeddings) + 0.9 M LoRA (r=16 on q, v)
    assert 1.0e8 < cfg["encoder_params"] < 1.1e8
    assert cfg["seq_positions"] == 36 and cfg["layers"] == 30 and cfg["attn_width"] == 576
    for row in r["rows"]:
        b, s = row["batch_size"], 36
        flops = 2 * cfg["encoder_params"] * b * s + 4 * 30 * b * s * s * 576
        assert row["flops_per_batch"] == pytest.approx(flops)
        assert row["achieved_tflops"] == pytest.approx(flops / row["seconds_median"] / 1e12)
        assert row["fraction_of_peak"] == pytest.approx(row["achieved_tflops"] / 2.0)
        assert row["chunks_per_s"] == pytest.approx(b / row["seconds_median"])
        assert row["tokens_per_s"] == pytest.approx(32 * b / row["seconds_median"])


def test_bench_disk_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "disk.json"
    rc = _run(["bench", "disk", "--ks", 2, "--modes", "kv,embedding", "--tokens", 32, "--output", out,
               "--no-progress"])
    assert rc == 0
    r = json.loads(out.read_text())
    rows = {row["mode"]: row for row in r["rows"]}
    assert set(rows) == {"kv", "embedding"}
    kv, emb = rows["kv"], rows["embedding"]
    n_tok = kv["source_tokens"]
    assert kv["dtype"] == "float32"
    assert kv["nbytes"] == 2 * 30 * 3 * 2 * 64 * 4  # keys + values, 30 layers, 3 kv heads, k=2, head_dim 64
    assert emb["nbytes"] == 2 * 576 * 4  # k=2 vectors of the hidden size
    assert kv["full_kv_nbytes"] == 2 * 30 * 3 * n_tok * 64 * 4
    for row in (kv, emb):
        assert row["nbytes"] < row["stored_bytes"] < row["nbytes"] + 4096  # tensors + a small header
        assert row["ratio_vs_full_kv"] == pytest.approx(row["full_kv_stored_bytes"] / row["stored_bytes"])
    assert emb["ratio_vs_full_kv"] > kv["ratio_vs_full_kv"] > 1


def test_bench_store_runs(tmp_path: Path) -> None:
    pytest.importorskip("compressor_plugin.evaluation.bench_store")
    out = tmp_path / "store.json"
    assert _run(["bench", "store", "--n", 3, "--output", out]) == 0
    r = json.loads(out.read_text())
    assert r["kind"] == "bench-store" and r["result"]["median_ms"] > 0


def test_eval_plot_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    qa = {"kind": "eval-qa", "data": "x.jsonl", "n": 3, "systems": {
        "full-plain": {"f1": 0.5, "compression_ratio": 1.0}, "full": {"f1": 0.5, "compression_ratio": 1.0,
                                                                      "best_of": ["full-plain"]},
        "none": {"f1": 0.1, "compression_ratio": None}, "kv-k4": {"f1": 0.3, "compression_ratio": 30.0}}}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(qa))
    b.write_text(json.dumps({**qa, "data": "y.jsonl"}))
    png = tmp_path / "f1.png"
    assert _run(["eval", "plot", a, b, "--output", png]) == 0 and _is_png(png)
    c = tmp_path / "c.json"
    c.write_text(json.dumps({"kind": "bench-disk", "rows": []}))
    assert _run(["eval", "plot", a, c, "--output", tmp_path / "mixed.png"]) == 2
    assert "different kinds" in capsys.readouterr().err
    assert _run(["eval", "qa", "--data", tmp_path / "missing.jsonl", "--k", 4]) == 2
    assert "not found" in capsys.readouterr().err
    bad = _jsonl(tmp_path / "bad.jsonl", [{"context": "c", "question": "q"}])
    assert _run(["eval", "qa", "--data", bad, "--k", 4]) == 2
    assert "answers" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["qa", "regen"])
def test_eval_checks_every_checkpoint_before_running(command: str, qa_file: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from compressor_plugin.compressor import shipped_checkpoints
    from compressor_plugin.generation import Generator

    stale = tmp_path / "stale"
    shutil.copytree(shipped_checkpoints()["kv-k1"], stale)
    cfg = json.loads((stale / "config.json").read_text())
    cfg["config"]["base_fingerprint"] = "0" * 16
    (stale / "config.json").write_text(json.dumps(cfg))

    def no_generation(*_a: object, **_k: object) -> None:
        raise AssertionError("a system ran before the checkpoints were checked")

    monkeypatch.setattr(Generator, "generate_batch", no_generation)
    out = tmp_path / "out.json"
    assert _run(["eval", command, "--data", qa_file, "--checkpoint", "kv-k1", stale, "--output", out]) == 2
    assert "fingerprint" in capsys.readouterr().err and not out.exists()


def test_eval_qa_reference_gives_agreement_without_full_text(qa_file: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """--examples all keeps every answer; --reference measures agreement against them later,
    and a reference that lacks questions is refused before any model runs."""
    from compressor_plugin.evaluation.metrics import squad_scores
    from compressor_plugin.generation import Generator

    ref = tmp_path / "full.json"
    assert _run(["eval", "qa", "--data", qa_file, "--limit", 3, "--systems", "full", "--layouts", "plain",
                 "--examples", "all", "--max-new-tokens", 8, "--output", ref, "--no-progress"]) == 0
    full = json.loads(ref.read_text())["examples"]["full"]
    assert len(full) == 3  # all of them, not the first few
    out = tmp_path / "kv.json"
    assert _run(["eval", "qa", "--data", qa_file, "--limit", 3, "--k", 2, "--layouts", "plain",
                 "--systems", "compressed", "--examples", "all", "--reference", ref, "--max-new-tokens", 8,
                 "--output", out, "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert set(r["systems"]) == {"kv-k2"}
    answers = {e["id"]: e["prediction"] for e in full}
    rows = r["examples"]["kv-k2"]
    expected = sum(squad_scores(e["prediction"], [answers[e["id"]]])["f1"] for e in rows) / len(rows)
    assert r["systems"]["kv-k2"]["agreement_f1"] == pytest.approx(expected)
    import gzip

    gz = tmp_path / "full.json.gz"  # a gzip-compressed reference reads the same
    gz.write_bytes(gzip.compress(ref.read_bytes()))
    out_gz = tmp_path / "kv_gz.json"
    assert _run(["eval", "qa", "--data", qa_file, "--limit", 3, "--k", 2, "--layouts", "plain",
                 "--systems", "compressed", "--reference", gz, "--max-new-tokens", 8,
                 "--output", out_gz, "--no-progress"]) == 0
    assert json.loads(out_gz.read_text())["systems"]["kv-k2"]["agreement_f1"] == pytest.approx(expected)
    # a compressed file that expands past the limit (a gzip bomb) is refused, not read into memory
    import compressor_plugin.commands.eval as eval_cmd

    monkeypatch.setattr(eval_cmd, "MAX_REFERENCE_BYTES", 1000)
    bomb = tmp_path / "bomb.json.gz"
    bomb.write_bytes(gzip.compress(b" " * 100_000))
    with pytest.raises(ValueError, match="expands past 1000 bytes"):
        eval_cmd.read_result_bytes(bomb)
    assert _run(["eval", "qa", "--data", qa_file, "--limit", 3, "--k", 2, "--systems", "compressed",
                 "--reference", bomb, "--output", tmp_path / "x.json", "--no-progress"]) != 0
    assert not (tmp_path / "x.json").exists()
    full_f1 = sum(e["f1"] for e in full) / len(full)
    kv_f1 = r["systems"]["kv-k2"]["f1"]
    assert r["systems"]["kv-k2"]["retention_f1"] == (pytest.approx(kv_f1 / full_f1) if full_f1 > 0 else None)

    def no_generation(*_a: object, **_k: object) -> None:
        raise AssertionError("a system ran before the reference was checked")

    monkeypatch.setattr(Generator, "generate_batch", no_generation)
    capsys.readouterr()
    # the reference answered 3 questions; this run asks 4
    assert _run(["eval", "qa", "--data", qa_file, "--k", 2, "--systems", "compressed", "--reference", ref]) == 2
    assert "lacks 1 of this run's 4 questions" in capsys.readouterr().err
    assert _run(["eval", "qa", "--data", qa_file, "--limit", 3, "--chunks", 2, "--k", 2, "--systems", "compressed",
                 "--reference", ref]) == 2
    assert "chunks per question" in capsys.readouterr().err
    # the same ids with other questions (another data file) and rows without an id are not answers to this run
    forged = json.loads(ref.read_text())
    forged["examples"]["full"][0]["question"] = "Which question was this?"
    forged["examples"]["full"].append({"prediction": "x", "f1": 1.0})
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    assert _run(["eval", "qa", "--data", qa_file, "--limit", 3, "--k", 2, "--systems", "compressed",
                 "--reference", tmp_path / "forged.json"]) == 2
    assert "asks other questions under 1 of this run's ids" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("{not json")
    assert _run(["eval", "qa", "--data", qa_file, "--k", 2, "--reference", tmp_path / "junk.json"]) == 2
    assert "not a readable result JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: "expected a number >= 0 or 'all'"
        _run(["eval", "qa", "--data", qa_file, "--k", 2, "--examples", "-1"])
