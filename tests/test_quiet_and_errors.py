"""Quiet by default, and errors from one module that name what is at fault."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
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



PUNCTUATION_SAMPLE = "Paris , France . It 's 1889 ! ( a )"
# decoded text recorded with transformers 5.17 and 5.24 (which ignore the clean-up switch for BPE
# tokenizers) and, for a tokenizer saved with clean_up_tokenization_spaces=True, 5.5 (which applies it)
KEPT, CLEANED = "Paris , France . It 's 1889 ! ( a )", "Paris, France. It's 1889! ( a )"
_DECODE = """
import json, sys
from compressor_plugin.models import load_base_model, load_tokenizer
toks = [load_base_model(device="cpu").tokenizer] + [load_tokenizer(p) for p in sys.argv[2:]]
out = []
for tok in toks:
    ids = tok(sys.argv[1], add_special_tokens=False)["input_ids"]
    out.append([tok.decode(ids), tok.batch_decode([ids])[0], tok.decode(ids, skip_special_tokens=True)])
ignored = hasattr(toks[0], "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
print(json.dumps({"decoded": out, "bpe_cleanup_ignored": ignored}))
"""


def test_default_tokenizer_loads_and_decodes_without_the_bpe_cleanup_message(tmp_path: Path):
    """No "Ignoring clean_up_tokenization_spaces=True for BPE tokenizer" line, and unchanged text.

    Also for a tokenizer folder saved with ``clean_up_tokenization_spaces: true``, as transformers
    5.0-5.17 write it when they convert the default model's GGUF tokenizer. A fresh process, as
    transformers prints the message once per process.
    """
    from compressor_plugin.models import ensure_default_model

    src, saved = ensure_default_model(), tmp_path / "tok-cleanup-true"
    saved.mkdir()
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith((".jinja", "special_tokens_map.json")):
            shutil.copy(f, saved / f.name)
    cfg = json.loads((saved / "tokenizer_config.json").read_text())
    (saved / "tokenizer_config.json").write_text(json.dumps(dict(cfg, clean_up_tokenization_spaces=True)))
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo)] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p]), PYTHONWARNINGS="always")
    proc = subprocess.run([sys.executable, "-c", _DECODE, PUNCTUATION_SAMPLE, str(saved)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "clean_up_tokenization" not in proc.stderr and "Ignoring" not in proc.stderr, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    default, saved_true = result["decoded"]
    assert default == [KEPT] * 3
    # where transformers ignores the switch the text is kept; where it applies it, it still does
    assert saved_true == [KEPT if result["bpe_cleanup_ignored"] else CLEANED] * 3


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
