"""Shared fixtures: the real default model is loaded once per test session."""

from __future__ import annotations

import os

# On small shared CPU machines torch's OpenMP threads spin while waiting and slow every step
# several-fold; passive waiting keeps the suite fast. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def base():
    """The real default base model (SmolLM2-135M-Instruct), fp32 on CPU."""
    from compressor_plugin.models import load_base_model

    return load_base_model(device="cpu")


@pytest.fixture(scope="session")
def shipped_compressor():
    """The shipped default compressor (kv-k16) on a second copy of the default model.

    A compressor injects its LoRA into its base model in place, and a base that carries one is
    refused by ``Generator(base)``; loading its own copy keeps the session's ``base`` plain,
    whatever order the tests run in. Every test module that needs the shipped compressor shares
    this fixture (an untrained k=16 compressor when no checkpoint ships)."""
    from compressor_plugin.compressor import Compressor, CompressorConfig, shipped_checkpoints
    from compressor_plugin.models import load_base_model

    own = load_base_model(device="cpu")
    if "kv-k16" in shipped_checkpoints():
        return Compressor.from_pretrained("default", base=own)
    return Compressor(own, CompressorConfig(k=16))


@pytest.fixture(scope="session")
def generator(base):
    """A Generator over the plain default model (no compressor attached)."""
    from compressor_plugin.generation import Generator

    return Generator(base)


@pytest.fixture(scope="session")
def tiny():
    """A small randomly initialised Llama (plumbing and shape tests only)."""
    from compressor_plugin.models import tiny_random_llama

    return tiny_random_llama(seed=0)


@pytest.fixture()
def tiny_compressor():
    """A fresh untrained kv compressor (k=4) on its own tiny random Llama."""
    from compressor_plugin.compressor import Compressor, CompressorConfig
    from compressor_plugin.models import tiny_random_llama

    return Compressor(tiny_random_llama(seed=1), CompressorConfig(k=4, mode="kv", lora_r=4, max_length=64))


def pytest_configure(config: pytest.Config) -> None:
    # langchain-tests' standard suite times model construction with pytest-benchmark: run the
    # timed function once, as a check, without printing a statistics table at the end of the run
    if hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True
