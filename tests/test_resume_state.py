"""A training run folder may be planted or damaged: resuming trusts nothing in it.

``state.pt`` is read without unpickling code, and every field resuming uses is checked (the
step against the run's length, the optimizer state against the optimizer) before anything is
loaded; the full-tuned reference's ``adapter_model.safetensors`` gets the checks a compressor
checkpoint's weights get. Faults raise :class:`TrainingStateError` or
:class:`CheckpointMismatchError` naming the file, never a bare ``KeyError`` or a hang.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compressor_plugin.errors import CheckpointMismatchError, TrainingStateError
from compressor_plugin.training.trainer import MAX_RESUME_STEPS, _load_trainable, add_teacher_answers, read_resume_state


def _opt() -> torch.optim.Optimizer:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.98))


def _state(step: int = 3) -> dict:
    opt = _opt()
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()
    return {"optimizer": opt.state_dict(), "step": step}


def _write(tmp_path: Path, state) -> Path:
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path


def test_a_good_state_resumes(tmp_path):
    opt = _opt()
    opt_state, step = read_resume_state(_write(tmp_path, _state(3)), opt, max_steps=10)
    opt.load_state_dict(opt_state)
    assert step == 3 and len(opt.state) == 2


@pytest.mark.parametrize("step", [10 ** 15, -1, 11, "3", 3.0, True, None])
def test_step_of_the_wrong_type_or_range_is_refused_at_once(tmp_path, step):
    t0 = time.monotonic()
    with pytest.raises(TrainingStateError, match="state.pt.*step") as err:
        read_resume_state(_write(tmp_path, _state(step)), _opt(), max_steps=10)
    assert time.monotonic() - t0 < 5 and err.value.path.endswith("state.pt")


def test_step_without_max_steps_is_bounded(tmp_path):
    with pytest.raises(TrainingStateError, match="step"):
        read_resume_state(_write(tmp_path, _state(MAX_RESUME_STEPS + 1)), _opt(), max_steps=None)
    assert read_resume_state(_write(tmp_path, _state(7)), _opt(), max_steps=None)[1] == 7


@pytest.mark.parametrize("edit,match", [
    (lambda s: {"step": 3}, "optimizer"),
    (lambda s: {"optimizer": s["optimizer"]}, "step"),
    (lambda s: {**s, "evil": 1}, "evil"),
    (lambda s: [s], "not a dict"),
])
def test_missing_or_unknown_keys_are_refused_not_key_errors(tmp_path, edit, match):
    with pytest.raises(TrainingStateError, match=match) as err:
        read_resume_state(_write(tmp_path, edit(_state())), _opt(), max_steps=10)
    assert not isinstance(err.value, KeyError)


def _edit_opt(fn):
    def edit(s):
        fn(s["optimizer"])
        return s
    return edit


@pytest.mark.parametrize("edit", [
    _edit_opt(lambda o: o.pop("state")),
    _edit_opt(lambda o: o.update(param_groups=[])),
    _edit_opt(lambda o: o["param_groups"].append(dict(o["param_groups"][0]))),
    _edit_opt(lambda o: o["param_groups"][0].update(params=[0])),
    _edit_opt(lambda o: o["param_groups"][0].update(params=[0, 7])),
    _edit_opt(lambda o: o["state"].update({9: o["state"][0]})),
    _edit_opt(lambda o: o["state"][0].pop("exp_avg")),
    _edit_opt(lambda o: o["state"][0].update(exp_avg=torch.zeros(1))),
    _edit_opt(lambda o: o["state"][0].update(exp_avg=torch.zeros(3, 2, dtype=torch.int64))),
    _edit_opt(lambda o: o["state"][1].update(exp_avg_sq=torch.full((4,), float("nan")))),
    _edit_opt(lambda o: o["state"][1].update(step=torch.tensor(-5.0))),
    _edit_opt(lambda o: o["state"][1].update(step="x")),
], ids=["no_state", "no_groups", "extra_group", "fewer_params", "other_params", "unknown_param",
        "missing_moment", "wrong_shape", "int_moment", "nan_moment", "negative_step", "non_tensor_step"])
def test_optimizer_state_that_does_not_fit_the_optimizer_is_refused(tmp_path, edit):
    with pytest.raises(TrainingStateError, match="state.pt.*optimizer"):
        read_resume_state(_write(tmp_path, edit(_state())), _opt(), max_steps=10)


def test_optimizer_settings_come_from_the_run_not_the_file(tmp_path):
    s = _state()
    s["optimizer"]["param_groups"][0].update(maximize=True, weight_decay=1e9, betas=(0.0, 0.0))
    opt = _opt()
    opt_state, _ = read_resume_state(_write(tmp_path, s), opt, max_steps=10)
    opt.load_state_dict(opt_state)
    group = opt.param_groups[0]
    assert group["maximize"] is False and group["weight_decay"] == 0.0 and group["betas"] == (0.9, 0.98)


def test_a_file_that_is_not_a_torch_state_is_refused(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(TrainingStateError, match="state.pt"):
        read_resume_state(path, _opt(), max_steps=10)

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"optimizer": Evil(), "step": 1}, path)
    with pytest.raises(TrainingStateError, match="state.pt"):
        read_resume_state(path, _opt(), max_steps=10)



# ---------------------------------------------------------------------------------- cached teacher answers
def _teacher_samples():
    from types import SimpleNamespace

    return [SimpleNamespace(question=f"q{i}", context=f"c{i}", teacher=None) for i in range(2)]


def _digest(s) -> str:
    import hashlib

    return hashlib.sha256(f"{s.question}\x00{s.context}".encode("utf-8")).hexdigest()


def test_cached_teacher_answers_are_used_as_they_are(tmp_path):
    samples = _teacher_samples()
    cache = tmp_path / "teacher_answers_qa.json"
    cache.write_text(json.dumps({_digest(s): f"answer {i}" for i, s in enumerate(samples)}))
    assert add_teacher_answers(None, samples, cache) == 0  # nothing to generate: no model needed
    assert [s.teacher for s in samples] == ["answer 0", "answer 1"]


@pytest.mark.parametrize("edit", ["int", "list", "dict", "not_a_digest", "not_an_object", "nested", "not_json"])
def test_planted_teacher_answers_that_are_not_answer_strings_are_refused(tmp_path, edit):
    samples = _teacher_samples()
    cache = tmp_path / "teacher_answers_qa.json"
    good = {_digest(s): "answer" for s in samples}
    key = _digest(samples[0])
    planted = {
        "int": {**good, key: 5}, "list": {**good, key: ["a"]}, "dict": {**good, key: {"a": 1}},
        "not_a_digest": {**good, "../x": "answer"}, "not_an_object": list(good),
    }
    if edit == "nested":
        cache.write_text("[" * 50_000)
    elif edit == "not_json":
        cache.write_bytes(b"\xff{")
    else:
        cache.write_text(json.dumps(planted[edit]))
    before = cache.read_bytes()
    with pytest.raises(TrainingStateError, match="teacher_answers_qa.json"):
        add_teacher_answers(None, samples, cache)
    assert cache.read_bytes() == before and all(s.teacher is None for s in samples)

# ---------------------------------------------------------------------------------- full-tuned adapter
@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from compressor_plugin.models import tiny_random_llama

    def fresh():
        return get_peft_model(tiny_random_llama(seed=2).model,
                              LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="none"))

    folder = tmp_path_factory.mktemp("run") / "checkpoint"
    fresh().save_pretrained(str(folder))
    return fresh, folder


def test_the_good_adapter_loads(adapter):
    fresh, folder = adapter
    _load_trainable(None, fresh(), folder)


@pytest.mark.parametrize("case", ["missing", "extra", "nan", "int", "wrong_shape"])
def test_a_planted_adapter_is_refused_before_loading(adapter, tmp_path, case):
    import shutil

    fresh, folder = adapter
    d = tmp_path / "checkpoint"
    shutil.copytree(folder, d)
    t = load_file(str(d / "adapter_model.safetensors"))
    name = sorted(t)[0]
    if case == "missing":
        t.pop(name)
    elif case == "extra":
        t["other"] = torch.zeros(2)
    elif case == "nan":
        t[name] = torch.full_like(t[name], float("nan"))
    elif case == "int":
        t[name] = t[name].to(torch.int32)
    else:
        t[name] = torch.zeros(3, 3)
    save_file(t, str(d / "adapter_model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="adapter_model.safetensors"):
        _load_trainable(None, fresh(), d)
