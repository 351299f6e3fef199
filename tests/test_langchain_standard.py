"""LangChain's standard chat-model test suites (langchain-tests) run against CompressedChatModel.

The real default base model is loaded once for the module; answers are kept short
(``max_tokens`` 8) so the integration suite stays quick on a CPU. Tool calling, structured
output, JSON mode and non-text inputs are not supported by the model: the suites skip those
tests through the capability properties below.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from typing import Any

import pytest

pytest.importorskip("langchain_tests")

from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

from compressor_plugin.integrations.langchain import CompressedChatModel  # noqa: E402


@functools.lru_cache(maxsize=1)
def _engine() -> Any:
    """One engine for the module: the shipped default compressor if present, else an untrained k=16 one."""
    from compressor_plugin.compressor import Compressor, CompressorConfig, shipped_checkpoints
    from compressor_plugin.engine import CompressionEngine
    from compressor_plugin.models import load_base_model
    from compressor_plugin.store import ContextStore

    folder = tempfile.mkdtemp(prefix="lc-standard-store-")
    atexit.register(shutil.rmtree, folder, True)
    store = ContextStore(folder)
    if "kv-k16" in shipped_checkpoints():
        return CompressionEngine.from_pretrained("default", store=store, device="cpu")
    return CompressionEngine(Compressor(load_base_model(device="cpu"), CompressorConfig(k=16)), store)


class _Params:
    @property
    def chat_model_class(self) -> type[CompressedChatModel]:
        return CompressedChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": _engine()}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True


class TestCompressedChatModelUnit(_Params, ChatModelUnitTests):
    """Construction, standard parameters, tracing parameters."""

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        # the suite's defaults without ``timeout`` and ``max_retries``: a local model makes no
        # network calls, and options the model would ignore are refused (UnknownOptionError)
        return {"temperature": 0, "max_tokens": 100, "stop": []}


class TestCompressedChatModelIntegration(_Params, ChatModelIntegrationTests):
    """invoke / ainvoke / stream / astream / batch / conversations / usage metadata / stop, on the real model."""

    # The suite's async tests carry no marker and the project runs pytest-asyncio in strict
    # mode: mark the class (the suite forbids overriding its tests) and silence the notice
    # pytest-asyncio gives for the sync tests the class mark also reaches.
    pytestmark = [pytest.mark.asyncio,
                  pytest.mark.filterwarnings("ignore:.*is marked with '@pytest.mark.asyncio' but it is not an async")]

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        # short answers keep the suite fast on a CPU; every test still generates real text
        return {"max_tokens": 8, "temperature": 0}

