"""``compressor-plugin bench generate`` end to end (tiny settings, real default model on the CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compressor_plugin.cli import main


def test_bench_generate_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, md, png = tmp_path / "gen.json", tmp_path / "gen.md", tmp_path / "gen.png"
    systems = "engine-text-static,engine-chunks-static,engine-chunks-dynamic,hf-dynamic"
    rc = main([str(a) for a in ["bench", "generate", "--device", "cpu", "--n", 2, "--tokens", 16, "--new-tokens", 3,
                                "--repeats", 1, "--k", 4, "--systems", systems, "--output", out, "--table", md,
                                "--plot", png, "--no-progress"]])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| system | prompt positions |" in printed and md.read_text().strip() in printed
    r = json.loads(out.read_text())
    assert r["kind"] == "bench-generate" and r["config"]["device"] == "cpu"
    rows = {row["system"]: row for row in r["rows"]}
    assert list(rows) == systems.split(",")
    for name, row in rows.items():
        assert row["new_tokens"] == 3 and row["compiled"] is False, name
        assert 0 < row["ttft_ms"] <= row["total_ms"] * 1.5, name
        assert row["ms_per_token"] == pytest.approx((row["total_ms"] - row["ttft_ms"]) / 2)
    # 2 chunks of ~16 tokens as text; as 2 compressed chunks of k=4 the prompt is 2 * (16 - 4) shorter
    text, chunks = rows["engine-text-static"]["prompt_tokens"], rows["engine-chunks-static"]["prompt_tokens"]
    assert text == rows["hf-dynamic"]["prompt_tokens"]
    assert 20 <= text - chunks <= 28
    assert rows["hf-dynamic"]["decode_vs_hf_dynamic"] == 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bench", "generate", "--systems", "engine-text-static,nope", "--k", "4", "--device", "cpu"]) == 2
    assert "unknown system(s) ['nope']" in capsys.readouterr().err
