"""A compressor checkpoint is a folder someone may have downloaded: nothing in it is trusted.

Each test plants or breaks one thing in a small checkpoint (a tiny random Llama) and checks
that loading fails with :class:`CheckpointMismatchError` naming the problem, before anything
large is allocated, never hangs, and never yields a compressor with weights it did not read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compressor_plugin.compressor import Compressor, CompressorConfig, read_checkpoint
from compressor_plugin.errors import CheckpointMismatchError
from compressor_plugin.models import tiny_random_llama


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    comp = Compressor(tiny_random_llama(seed=1), CompressorConfig(k=4, lora_r=4, max_length=64))
    return comp.save_pretrained(tmp_path_factory.mktemp("ckpt") / "good")


def variant(good: Path, tmp_path: Path, *, config=None, meta=None, tensors=None) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(good, d)
    m = json.loads((d / "config.json").read_text())
    if config:
        config(m["config"])
    if meta:
        m = meta(m)
    (d / "config.json").write_text(json.dumps(m))
    if tensors:
        save_file(tensors(load_file(str(d / "weights.safetensors"))), str(d / "weights.safetensors"))
    return d


def load(d: Path) -> Compressor:
    return Compressor.from_pretrained(d, base=tiny_random_llama(seed=1))


def test_the_good_checkpoint_loads(good):
    assert load(good).k == 4


@pytest.mark.parametrize("field,value", [
    ("k", "4"), ("k", 4.5), ("k", True), ("lora_r", "4"), ("lora_r", 0), ("lora_r", -1),
    ("lora_alpha", float("nan")), ("lora_alpha", "32"), ("lora_alpha", 1e30), ("lora_alpha", 0), ("lora_alpha", -8), ("lora_dropout", 2.0), ("max_length", "64"),
    ("max_length", 0), ("target_modules", "q_proj"), ("target_modules", []), ("target_modules", [1]),
    ("base_model", ["x"]), ("base_fingerprint", 3), ("mode", 1),
])
def test_config_values_of_the_wrong_type_or_range_are_refused(good, tmp_path, field, value):
    d = variant(good, tmp_path, config=lambda c: c.update({field: value}))
    with pytest.raises(CheckpointMismatchError, match=field):
        load(d)


def test_unknown_config_field_and_non_object_config_are_refused(good, tmp_path):
    d = variant(good, tmp_path, config=lambda c: c.update(evil=1))
    with pytest.raises(CheckpointMismatchError, match="evil"):
        load(d)
    shutil.rmtree(d)
    d = variant(good, tmp_path, meta=lambda m: {**m, "config": [1]})
    with pytest.raises(CheckpointMismatchError, match="config"):
        load(d)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointMismatchError, match="not a compressor checkpoint"):
        read_checkpoint(d)



@pytest.mark.parametrize("targets", [["mlp"], ["layers"], ["model"], ["embed_tokens"], ["q_proj", "nothing"]])
def test_target_modules_that_are_not_linear_layers_of_the_model_are_refused(good, tmp_path, targets):
    d = variant(good, tmp_path, config=lambda c: c.update(target_modules=targets))
    with pytest.raises(CheckpointMismatchError, match="target_modules names"):
        load(d)


def test_a_refused_checkpoint_leaves_the_base_model_as_it_was(good, tmp_path):
    base = tiny_random_llama(seed=1)
    d = variant(good, tmp_path, tensors=lambda t: {**t, "memory": torch.full_like(t["memory"], float("nan"))})
    with pytest.raises(CheckpointMismatchError, match="weights.safetensors"):
        Compressor.from_pretrained(d, base=base)
    assert not hasattr(base.model, "peft_config")
    assert Compressor.from_pretrained(good, base=base).k == 4  # the same base still takes a good checkpoint

def test_lora_rank_larger_than_the_model_is_refused_before_allocating(good, tmp_path):
    # r = 2**40 would ask for terabytes of LoRA matrices
    d = variant(good, tmp_path, config=lambda c: c.update(lora_r=2 ** 40))
    with pytest.raises(CheckpointMismatchError, match="lora_r"):
        load(d)


def test_deeply_nested_or_huge_config_is_refused_without_reading_it_all(good, tmp_path):
    d = variant(good, tmp_path)
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointMismatchError, match="config.json"):
        read_checkpoint(d)
    with open(d / "config.json", "wb") as fh:  # sparse: takes no disk, would take 4 GiB of memory
        fh.truncate(4 * 1024 ** 3)
    with pytest.raises(CheckpointMismatchError, match="too large"):
        read_checkpoint(d)


@pytest.mark.parametrize("case", ["memory_missing", "adapter_missing", "half_adapter_missing", "extra_tensor"])
def test_missing_or_extra_tensors_are_refused(good, tmp_path, case):
    edits = {
        "memory_missing": lambda t: {n: v for n, v in t.items() if n != "memory"},
        "adapter_missing": lambda t: {"memory": t["memory"]},
        "half_adapter_missing": lambda t: {n: v for i, (n, v) in enumerate(sorted(t.items())) if i % 2 or n == "memory"},
        "extra_tensor": lambda t: {**t, "other": torch.zeros(2)},
    }
    d = variant(good, tmp_path, tensors=edits[case])
    with pytest.raises(CheckpointMismatchError, match="weights.safetensors"):
        load(d)


@pytest.mark.parametrize("case", ["nan_memory", "inf_adapter", "int_memory", "int_adapter", "wrong_shape"])
def test_non_finite_wrong_dtype_or_wrong_shape_tensors_are_refused(good, tmp_path, case):
    def edit(t):
        t = dict(t)
        lora_b = next(n for n in sorted(t) if "lora_B" in n)
        lora_a = next(n for n in sorted(t) if "lora_A" in n)
        if case == "nan_memory":
            t["memory"] = torch.full_like(t["memory"], float("nan"))
        elif case == "inf_adapter":
            t[lora_b] = torch.full_like(t[lora_b], float("inf"))
        elif case == "int_memory":
            t["memory"] = torch.ones(t["memory"].shape, dtype=torch.int64)
        elif case == "int_adapter":
            t[lora_b] = t[lora_b].to(torch.int32)
        else:
            t[lora_a] = torch.zeros(3, 3, dtype=t[lora_a].dtype)
        return t

    d = variant(good, tmp_path, tensors=edit)
    with pytest.raises(CheckpointMismatchError, match="weights.safetensors"):
        load(d)


def test_weights_that_are_a_fifo_or_a_device_are_refused_without_hanging(good, tmp_path):
    d = variant(good, tmp_path)
    os.remove(d / "weights.safetensors")
    os.mkfifo(d / "weights.safetensors")
    # in a child process: safetensors blocks opening a FIFO while holding the GIL
    code = ("import sys; from compressor_plugin.compressor import Compressor; "
            "from compressor_plugin.models import tiny_random_llama\n"
            "try:\n Compressor.from_pretrained(sys.argv[1], base=tiny_random_llama(seed=1))\n"
            "except Exception as e: print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert "CheckpointMismatchError" in out.stdout and "regular file" in out.stdout, out.stdout + out.stderr[-2000:]
    os.remove(d / "weights.safetensors")
    os.symlink("/dev/zero", d / "weights.safetensors")
    with pytest.raises(CheckpointMismatchError, match="regular file"):
        load(d)


@pytest.fixture()
def no_network(monkeypatch):
    """Every name lookup and connection attempt is recorded and fails."""
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    try:  # huggingface_hub fetches a list for its User-Agent header once per process, even for local loads
        from huggingface_hub.utils import _detect_agent

        monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}}, raising=False)
    except ImportError:
        pass
    return attempts


def test_a_base_model_that_is_not_here_is_not_downloaded(good, tmp_path, no_network, monkeypatch):
    from compressor_plugin.errors import ModelNotAvailableError

    d = variant(good, tmp_path, config=lambda c: c.update(base_model="someone/any-model"))
    with pytest.raises(ModelNotAvailableError, match=r"someone/any-model.*(base=|allow_download=True)"):
        Compressor.from_pretrained(d)
    assert no_network == []
    calls = []  # asked for, the model may be downloaded

    def load(name, **kwargs):
        calls.append((name, kwargs["local_files_only"]))
        raise ModelNotAvailableError("stop here")

    monkeypatch.setattr("compressor_plugin.compressor.load_base_model", load)
    with pytest.raises(ModelNotAvailableError, match="stop here"):
        Compressor.from_pretrained(d, allow_download=True)
    assert calls == [("someone/any-model", False)]


def test_a_base_model_in_a_local_folder_loads_without_network(tmp_path, no_network):
    base = tiny_random_llama(seed=1)
    base.model.save_pretrained(tmp_path / "base")
    base.tokenizer.save_pretrained(tmp_path / "base")
    d = Compressor(base, CompressorConfig(k=4, lora_r=4, max_length=64, base_model=str(tmp_path / "base"))
                   ).save_pretrained(tmp_path / "ckpt")
    assert Compressor.from_pretrained(d).k == 4 and no_network == []
