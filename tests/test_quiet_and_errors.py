"""Quiet by default, and errors from one module that name what is at fault."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

import compressor_plugin
from compressor_plugin import errors


def test_loading_is_quiet_unless_verbose(capfd):
    from compressor_plugin.models import load_base_model

    load_base_model(device="cpu")
    assert "Loading weights" not in capfd.readouterr().err
    load_base_model(device="cpu", verbose=True)
    assert "Loading weights" in capfd.readouterr().err


def test_broken_checkpoint_config_names_the_file(tmp_path: Path):
    from compressor_plugin.compressor import CheckpointMismatchError, read_checkpoint, shipped_checkpoints

    src = shipped_checkpoints()["kv-k16"]
    dst = tmp_path / "kv-k16"
    shutil.copytree(src, dst)
    (dst / "config.json").write_text('{"format": "compressor_plugin.checkpoint/1", ')  # cut short
    with pytest.raises(CheckpointMismatchError, match=r"kv-k16/config\.json is not valid JSON"):
        read_checkpoint(dst)


def test_every_error_and_warning_shares_one_base_and_is_exported():
    exported = {name: getattr(compressor_plugin, name) for name in errors.__all__}
    for name, cls in exported.items():
        assert cls is getattr(errors, name)
        if issubclass(cls, Warning):
            assert issubclass(cls, errors.CompressorPluginWarning), name
        else:
            assert issubclass(cls, errors.CompressorPluginError), name
    # the built-in types they replaced still catch them
    assert issubclass(errors.MissingChunkError, KeyError)
    assert issubclass(errors.UnknownOptionError, TypeError)
    assert issubclass(errors.ContextTooLongError, ValueError)
    assert issubclass(errors.ModelNotAvailableError, RuntimeError)
    # the old import paths give the same classes
    from compressor_plugin.context import ContextFormatError
    from compressor_plugin.evaluation.data import DataError
    from compressor_plugin.integrations.langchain import EmptyDocumentWarning
    from compressor_plugin.integrations.llama_index import BrokenMarkerWarning
    from compressor_plugin.markers import MissingChunkWarning
    from compressor_plugin.models import ModelNotAvailableError, UnsupportedModelError

    assert ContextFormatError is errors.ContextFormatError and DataError is errors.DataError
    assert EmptyDocumentWarning is errors.EmptyDocumentWarning and BrokenMarkerWarning is errors.BrokenMarkerWarning
    assert MissingChunkWarning is errors.MissingChunkWarning
    assert ModelNotAvailableError is errors.ModelNotAvailableError
    assert UnsupportedModelError is errors.UnsupportedModelError


def test_errors_carry_fields_through_str_and_pickle():
    err = errors.ContextTooLongError("document 'd' is too long", tokens=700, limit=512, document_id="d",
                                     option="on_long")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is errors.ContextTooLongError and str(back) == "document 'd' is too long"
    assert (back.tokens, back.limit, back.document_id, back.option) == (700, 512, "d", "on_long")
    missing = errors.MissingChunkError("chunk abc is gone", key="abc")
    assert str(missing) == "chunk abc is gone" and missing.key == "abc"  # not KeyError's quoted repr
    assert errors.StoreFormatError("bad", path=Path("/x/store")).path == "/x/store"


def test_a_store_path_that_is_a_file_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from compressor_plugin import compressor as compressor_module
    from compressor_plugin.engine import CompressionEngine
    from compressor_plugin.errors import StoreFormatError

    afile = tmp_path / "afile"
    afile.write_text("not a store")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the store path was checked")

    monkeypatch.setattr(compressor_module.Compressor, "from_pretrained", no_load)
    with pytest.raises(StoreFormatError, match="is a file, not a folder") as err:
        CompressionEngine.from_pretrained(store=afile)
    assert str(err.value.path) == str(afile)


def test_an_unknown_checkpoint_and_fp16_are_package_errors():
    from compressor_plugin.compressor import Compressor
    from compressor_plugin.errors import CheckpointNotFoundError, CompressorPluginError, InvalidOptionError

    with pytest.raises(CheckpointNotFoundError, match="shipped names") as err:
        Compressor.from_pretrained("kv-k99")
    assert isinstance(err.value, (CompressorPluginError, FileNotFoundError))
    with pytest.raises(InvalidOptionError, match="float16"):
        Compressor.from_pretrained("kv-k16", dtype="float16")
