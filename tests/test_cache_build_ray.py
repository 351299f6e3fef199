"""``cache build --ray`` on a local Ray instance with 2 CPU workers equals the single-process build."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor_plugin.caching import build_cache, read_chunk_map
from compressor_plugin.caching.ray_build import default_shard_dir
from compressor_plugin.compressor import Compressor, CompressorConfig
from compressor_plugin.models import load_base_model, tiny_random_llama
from compressor_plugin.store import ContextStore

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason='Ray is not installed (pip install "ray[data]")')

REPO = Path(__file__).resolve().parents[1]
WORDS = "orbit canyon ledger beacon signal river matrix protein galaxy harbor lattice engine".split()


def write_corpus(folder: Path) -> Path:
    rng = random.Random(7)

    def para(n: int) -> str:
        return " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."
                        for _ in range(n))

    folder.mkdir(parents=True)
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as fh:
        for i in range(12):
            fh.write(json.dumps({"id": f"d{i}", "text": "\n\n".join(para(4) for _ in range(rng.randint(1, 3)))}) + "\n")
        fh.write("{broken\n")
    (folder / "long.md").write_text("\n\n".join(para(5) for _ in range(6)), encoding="utf-8")
    (folder / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    return folder


def entries(directory: Path) -> dict[str, tuple]:
    with ContextStore(directory, size_limit=None) as st:
        return {key: (st.get(key), st.get_text(key)) for key in st.keys()}


def test_ray_build_equals_single_process_build(tmp_path):
    tiny = tiny_random_llama(seed=4)
    tiny.model.save_pretrained(tmp_path / "base")
    tiny.tokenizer.save_pretrained(tmp_path / "base")
    base = load_base_model(tmp_path / "base", device="cpu")
    ckpt = Compressor(base, CompressorConfig(k=4, lora_r=4, max_length=96, base_model=str(tmp_path / "base"))
                      ).save_pretrained(tmp_path / "ckpt")
    src = write_corpus(tmp_path / "in")

    single = build_cache(src, tmp_path / "single", Compressor.from_pretrained(ckpt, device="cpu"), chunk_tokens=96,
                         batch_size=4, map_path=tmp_path / "single.jsonl", progress=False)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p]))
    shards = tmp_path / "shards"
    cmd = [sys.executable, "-m", "compressor_plugin.cli", "cache", "build", "--input", str(src),
           "--store", str(tmp_path / "ray"), "--checkpoint", str(ckpt), "--chunk-tokens", "96", "--batch-size", "3",
           "--map", str(tmp_path / "ray.jsonl"), "--ray", "--ray-address", "local", "--num-workers", "2",
           "--num-gpus-per-worker", "0", "--shard-dir", str(shards), "--no-progress", "--json"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)

    assert (out["documents"], out["chunks"], out["new"]) == (single.documents, single.chunks, single.new)
    assert out["kept_as_text"] == single.kept_as_text > 0 and single.new > single.kept_as_text  # short-chunk rule
    assert out["skipped"] == single.skipped == {"bad_json": 1, "not_utf8": 1}
    assert out["workers"] == 2 and 1 <= out["actors_used"] == out["shards_merged"] <= 2
    assert out["unmerged_shards"] == []
    assert not any(shards.iterdir()), "merged shards are deleted"

    a, b = entries(tmp_path / "single"), entries(tmp_path / "ray")
    assert set(a) == set(b) and len(a) == single.new
    for key, (ctx_a, text_a) in a.items():
        ctx_b, text_b = b[key]
        assert text_a == text_b and ctx_a.source_tokens == ctx_b.source_tokens
        assert ctx_a.compressor_fingerprint == ctx_b.compressor_fingerprint
        assert torch.allclose(ctx_a.keys, ctx_b.keys, rtol=1e-4, atol=1e-4)
        assert torch.allclose(ctx_a.values, ctx_b.values, rtol=1e-4, atol=1e-4)

    def rows(name: str) -> list[tuple]:
        return sorted(tuple(sorted(r.items())) for r in read_chunk_map(tmp_path / name))

    assert rows("ray.jsonl") == rows("single.jsonl") and len(rows("ray.jsonl")) == single.chunks

    # Run again: everything is stored, so Ray is not even started and nothing is added.
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = json.loads(proc.stdout)
    assert again["new"] == 0 and again["already_stored"] == single.new and again["map_rows"] == 0
    assert default_shard_dir(tmp_path / "ray") != shards  # the default is per target store, under the temp folder
