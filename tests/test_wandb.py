"""Weights & Biases logging: optional, on when config.wandb.project is set. A recording
stand-in for the wandb module checks every call against metrics.jsonl and results.json;
a real wandb run in offline mode checks that the logged values reach W&B's own run file;
without wandb installed, a run asking for it stops before anything runs."""
import glob
import importlib.machinery
import importlib.util
import json
import os
import re
import sys
import types

import pytest

from pecft_jax.train.loop import train_and_evaluate

from helpers import tiny_config


def _config(**wandb):
    c = tiny_config("simplecil")  # no gradient steps: fast, and still every eval record
    c.scenario.num_tasks = 2
    for key, value in wandb.items():
        c.wandb[key] = value
    return c


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


class _FakeRun:
    def __init__(self, calls, **kwargs):
        self.calls, self.kwargs, self.summary = calls, kwargs, {}
        calls.append(("init", kwargs))

    def define_metric(self, name, step_metric=None):
        self.calls.append(("define_metric", name, step_metric))

    def log(self, record):
        self.calls.append(("log", dict(record)))

    def finish(self, exit_code=0):
        self.calls.append(("finish", dict(self.summary), exit_code))


def test_wandb_receives_every_logged_scalar_and_the_final_metrics(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: _FakeRun(calls, **kwargs)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    workdir = str(tmp_path / "run")
    config = _config(project="pecft", tags=("demo",))
    results = train_and_evaluate(config, workdir)

    init = calls[0][1]
    assert (init["project"], init["name"], init["dir"], init["resume"]) == (
        "pecft", "run", workdir, "allow")
    assert init["tags"] == ["demo"] and init["entity"] is None and init["mode"] is None
    assert init["config"]["train.learning_rate"] == config.train.learning_rate
    assert init["config"]["method.name"] == "simplecil"
    with open(os.path.join(workdir, "wandb_run_id.txt")) as f:
        assert init["id"] == f.read().strip() and re.fullmatch(r"[a-z0-9]{12}", init["id"])
    # records are plotted against the run's global step, a field of each record
    assert ("define_metric", "*", "global_step") in calls
    # every record of metrics.jsonl, with its global step and task, and nothing else -- both
    # evaluations, though SimpleCIL logs them at one global step (no gradient steps)
    logged = [c[1] for c in calls if c[0] == "log"]
    expected = [{"global_step": r["step"], **{k: v for k, v in r.items() if k != "step"}}
                for r in _records(workdir)]
    assert logged == expected and len(logged) == 2
    assert [r["global_step"] for r in logged] == [0, 0] and [r["task"] for r in logged] == [0, 1]
    finish = [c for c in calls if c[0] == "finish"]
    assert len(finish) == 1 and calls[-1][0] == "finish" and finish[0][2] == 0
    assert finish[0][1]["hparam/average_accuracy"] == pytest.approx(
        results["metrics"]["average_accuracy"])

    # re-evaluating the run's checkpoints logs nothing, so it needs no wandb
    from pecft_jax.evaluate import evaluate_checkpoint
    real = importlib.util.find_spec
    with monkeypatch.context() as patch:
        patch.delitem(sys.modules, "wandb")
        patch.setattr(importlib.util, "find_spec",
                      lambda name, *args: None if name == "wandb" else real(name, *args))
        again = evaluate_checkpoint(workdir)
    assert again["class_il"] == again["recorded_class_il"]

    # a second run in the workdir (a resume) continues the same W&B run
    calls.clear()
    train_and_evaluate(_config(project="pecft"), workdir)
    assert calls[0][1]["id"] == init["id"]

    # a run that fails is marked so (exit code 1)
    calls.clear()
    failing = _config(project="pecft")
    with monkeypatch.context() as patch:
        from pecft_jax.train.loop import ContinualTrainer

        def broken(self, *args, **kwargs):
            self.writer.write(0, {"probe": 1.0})  # W&B has started
            raise RuntimeError("a crash")
        patch.setattr(ContinualTrainer, "learn_task", broken)
        with pytest.raises(RuntimeError, match="a crash"):
            train_and_evaluate(failing, str(tmp_path / "failing"))
    assert calls[-1][0] == "finish" and calls[-1][2] == 1


def test_a_real_offline_wandb_run_holds_the_logged_values(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = str(tmp_path)
    train_and_evaluate(_config(project="pecft", mode="offline"), workdir)
    with open(os.path.join(workdir, "wandb_run_id.txt")) as f:
        run_id = f.read().strip()
    files = glob.glob(os.path.join(workdir, "wandb", f"offline-run-*-{run_id}",
                                   f"run-{run_id}.wandb"))
    assert len(files) == 1
    with open(files[0], "rb") as f:
        data = f.read()
    # W&B's run file is a record log of protobufs; a history or summary item is its key
    # followed by value_json (field 16: tag bytes 0x82 0x01, then the length)
    def values(key):
        found = []
        for m in re.finditer(re.escape(key.encode()) + rb"\x82\x01", data):
            length = data[m.end()]
            found.append(float(data[m.end() + 1:m.end() + 1 + length]))
        return found
    last = _records(workdir)[-1]
    for key in ("eval/average_accuracy", "eval/class_il_task0", "eval/task_il_task1"):
        assert last[key] in values(key), key


def test_wandb_asked_for_but_missing_stops_before_anything_runs(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "wandb" else real(name, *args))
    with pytest.raises(ValueError, match="wandb is not installed: pip install wandb"):
        train_and_evaluate(_config(project="pecft"), str(tmp_path))
    assert not os.path.exists(os.path.join(str(tmp_path), "metrics.jsonl"))
