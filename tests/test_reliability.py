"""No silent wrong results: damaged checkpoints, diverged training, torn files."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pecft_jax import files
from pecft_jax.report import format_results
from pecft_jax.train.checkpoint import (Checkpointer, CheckpointCorrupt, CheckpointMismatch,
                                        _meta_digest)
from pecft_jax.train.loop import NonFiniteError, guard_nonfinite, train_and_evaluate

from helpers import ROOT, assert_same_task_checkpoint, tiny_config


# ------------------------------------------------------------------------- atomic files
def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = str(tmp_path / "results.json")
    files.write_json_atomic(path, {"a": 1})
    assert open(path).read() == '{"a": 1}'

    def crash(src, dst):
        raise KeyboardInterrupt  # a kill between writing and renaming

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        files.write_json_atomic(path, {"a": 2, "long": "x" * 10_000})
    assert open(path).read() == '{"a": 1}'  # the previous good file, whole
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind


# ---------------------------------------------------------------- checkpoint integrity
def _trees(seed=0):
    rng = np.random.default_rng(seed)
    trainable = {"prompts": rng.standard_normal((4, 3, 8)).astype(np.float32),
                 "head": {"kernel": rng.standard_normal((8, 5)).astype(np.float32),
                          "bias": np.zeros(5, np.float32)}}
    state = {"counts": np.arange(4, dtype=np.float32), "empty": {}}
    return trainable, state


def _save_both_kinds(workdir):
    """A task-end checkpoint (tasks/0) and a mid-task one with an optimizer state
    (latest/7); returns what a reader must get back from each."""
    import optax
    trainable, state = _trees()
    opt = optax.adam(0.1)
    opt_state = opt.init(trainable)
    ckpt = Checkpointer(workdir)
    meta = {"task": 0, "global_step": 5, "accuracy_matrix": [[50.0]]}
    ckpt.save(task_end=True, step=0, trainable=trainable, state=state, opt_state=None,
              rng=jax.random.key(1), meta=meta)
    ckpt.save(task_end=False, step=7, trainable=trainable, state=state, opt_state=opt_state,
              rng=jax.random.key(2), meta=dict(meta, global_step=7))
    ckpt.close()
    return opt.init(trainable)


def _restore(workdir, kind, step, target):
    ckpt = Checkpointer(workdir)
    try:
        out = ckpt.restore(kind, step, opt_state_target=target if kind == "latest" else None)
    finally:
        ckpt.close()
    return out


def _flat(out):
    leaves = jax.tree_util.tree_leaves_with_path(
        {k: out[k] for k in ("trainable", "state", "opt_state")})
    return ({jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves},
            np.asarray(jax.random.key_data(out["rng"])), out["meta"])


def _damage(path, how):
    data = bytearray(open(path, "rb").read())
    if how == "flip" and data:
        for i in (len(data) // 3, len(data) // 2, len(data) - 1):  # three bits
            data[i] ^= 0x10
    elif how == "truncate":
        data = data[:len(data) // 2]
    with open(path, "wb") as f:
        f.write(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_every_damaged_checkpoint_file_is_an_error_or_restores_exactly(tmp_path, how):
    """Damage one file of a checkpoint at a time (every file of both kinds): reading it
    back either raises a clear error or returns exactly what was saved -- never other
    values."""
    clean = str(tmp_path / "clean")
    target = _save_both_kinds(clean)
    errors = 0
    for kind, step in (("tasks", 0), ("latest", 7)):
        want = _flat(_restore(clean, kind, step, target))
        root = os.path.join(clean, "checkpoints", kind, str(step))
        paths = sorted(os.path.relpath(os.path.join(d, n), root)
                       for d, _, names in os.walk(root) for n in names)
        assert paths
        for rel in paths:
            work = str(tmp_path / "work")
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(clean, work)
            _damage(os.path.join(work, "checkpoints", kind, str(step), rel), how)
            try:
                got = _flat(_restore(work, kind, step, target))
            except CheckpointMismatch as err:
                assert f"{kind}/{step}" in str(err) and "damaged" in str(err)
                errors += 1
                continue
            assert sorted(got[0]) == sorted(want[0]), rel
            for key in want[0]:
                np.testing.assert_array_equal(got[0][key], want[0][key], err_msg=rel)
            np.testing.assert_array_equal(got[1], want[1])
            assert got[2] == want[2], rel
    assert errors > 0


def test_the_cli_shows_the_damaged_checkpoint_not_the_decoder_error_inside(tmp_path):
    """A byte of a checkpoint's JSON metadata made invalid UTF-8: orbax's UnicodeDecodeError
    is wrapped in CheckpointCorrupt, and the one line the CLI prints is that message (it
    used to print the innermost cause, which names no file)."""
    from pecft_jax.run import describe
    work = str(tmp_path)
    _save_both_kinds(work)
    path = os.path.join(work, "checkpoints", "latest", "7", "meta", "metadata")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] = 0xFF  # never valid in UTF-8
    open(path, "wb").write(bytes(data))
    ckpt = Checkpointer(work)
    try:
        with pytest.raises(CheckpointMismatch) as caught:
            ckpt.latest()
    finally:
        ckpt.close()
    assert isinstance(caught.value.__cause__, UnicodeDecodeError)
    line = describe(caught.value)
    assert line.startswith("checkpoint latest/7 in ") and "is damaged" in line, line
    assert "resumes from tasks/0" in line, line


def test_silently_changed_array_values_fail_their_checksum(tmp_path):
    """A storage fault that still decodes (other values under the same file names) is
    caught by the SHA-256 in the metadata, and the error offers the previous checkpoint."""
    workdir = str(tmp_path)
    _save_both_kinds(workdir)
    ckpt = Checkpointer(workdir)
    trainable, state = _trees()
    ckpt.save(task_end=True, step=1, trainable=trainable, state=state, opt_state=None,
              rng=jax.random.key(1), meta={"task": 1, "global_step": 9})
    meta = ckpt.read_meta("tasks", 1)
    arrays = ckpt._pack(trainable, state, None, jax.random.key(1))
    arrays["trainable/prompts"] = arrays["trainable/prompts"].copy()
    arrays["trainable/prompts"][0, 0, 0] = np.float32(1e38)  # one flipped exponent bit's worth
    meta_with_digest = dict(meta)
    meta_with_digest["meta_sha256"] = _meta_digest(meta)
    manager = ckpt._tasks
    manager.delete(1)
    manager.save(1, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                            meta=ocp.args.JsonSave(meta_with_digest)))
    manager.wait_until_finished()
    with pytest.raises(CheckpointCorrupt, match=r"tasks/1 .*trainable/prompts.*SHA-256.*tasks/0"):
        ckpt.restore("tasks", 1)
    ckpt.close()


def test_damaged_metadata_values_are_caught(tmp_path):
    workdir = str(tmp_path)
    _save_both_kinds(workdir)
    ckpt = Checkpointer(workdir)
    meta = ckpt.read_meta("tasks", 0)
    meta["accuracy_matrix"] = [[51.0]]  # a digit changed on disk, still valid JSON
    meta["meta_sha256"] = "0" * 64
    ckpt._tasks.delete(0)
    arrays = ckpt._pack(*_trees(), None, jax.random.key(1))
    ckpt._tasks.save(0, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                                meta=ocp.args.JsonSave(meta)))
    ckpt._tasks.wait_until_finished()
    with pytest.raises(CheckpointCorrupt, match="metadata fails its SHA-256"):
        ckpt.latest()
    ckpt.close()


# ------------------------------------------------------------------- non-finite values
def test_guard_keeps_or_records_a_non_finite_step():
    old = ({"w": jnp.ones(3)}, {"s": jnp.zeros(2)}, {"m": jnp.zeros(3)})
    bad = ({"w": jnp.array([1.0, jnp.nan, 2.0])}, {"s": jnp.ones(2)}, {"m": jnp.ones(3)},
           {"loss": jnp.float32(0.5)})
    good = ({"w": jnp.full(3, 2.0)}, {"s": jnp.ones(2)}, {"m": jnp.ones(3)},
            {"loss": jnp.float32(0.5)})
    health = jnp.array([-1, 0], jnp.int32)
    guard = jax.jit(guard_nonfinite, static_argnums=4)
    # skip: the step's inputs are kept and counted
    out = guard(bad, old, jnp.int32(4), health, True)
    np.testing.assert_array_equal(out[0]["w"], 1.0)
    np.testing.assert_array_equal(out[1]["s"], 0.0)
    assert out[4].tolist() == [-1, 1]
    out = guard(good, old, jnp.int32(5), out[4], True)
    np.testing.assert_array_equal(out[0]["w"], 2.0)
    assert out[4].tolist() == [-1, 1]
    # stop: the first unhealthy step is recorded (and kept: later steps do not overwrite it)
    out = guard(good, old, jnp.int32(2), health, False)
    assert out[4].tolist() == [-1, 0]
    out = guard(bad, old, jnp.int32(3), out[4], False)
    assert out[4].tolist() == [3, 0]
    nan_loss = good[:3] + ({"loss": jnp.float32(jnp.inf)},)
    assert guard(nan_loss, old, jnp.int32(9), out[4], False)[4].tolist() == [3, 0]


def _diverging_config():
    c = tiny_config()
    c.scenario.num_tasks = 2
    c.train.optimizer = "sgd"
    c.train.learning_rate = 1e39  # finite, but inf in float32: every step overflows
    c.train.checkpoint_every_steps = 0
    return c


def test_a_diverging_run_stops_naming_task_and_step_and_saves_nothing(tmp_path):
    with pytest.raises(NonFiniteError, match=r"task 0 \(0-based\), step 0 .*on_nonfinite"):
        train_and_evaluate(_diverging_config(), str(tmp_path))
    assert not os.path.exists(tmp_path / "results.json")
    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.latest() is None  # nothing diverged was checkpointed
    ckpt.close()


def test_skip_step_keeps_the_parameters_and_says_so_loudly(tmp_path):
    c = _diverging_config()
    c.train.on_nonfinite = "skip_step"
    results = train_and_evaluate(c, str(tmp_path))
    assert results["skipped_nonfinite_steps"] == results["train_steps"] > 0
    ckpt = Checkpointer(str(tmp_path))
    last = ckpt.restore("tasks", 1)
    ckpt.close()
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(last["trainable"]))
    assert "WARNING" in format_results(results) and "skipped" in format_results(results)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.1])
def test_a_non_finite_or_negative_learning_rate_is_refused_before_anything_runs(tmp_path, value):
    c = tiny_config()
    c.train.learning_rate = value
    with pytest.raises(ValueError, match="train.learning_rate must be a finite number"):
        train_and_evaluate(c, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize("field, value", [
    ("seed", -1), ("train.log_every_steps", 0), ("scenario.num_tasks", 0), ("train.epochs", -1),
    ("train.batch_size", 0), ("eval.batch_size", -8), ("train.learning_rate", float("nan")),
    ("train.momentum", 1.5), ("train.weight_decay", -1e-4), ("train.grad_clip_norm", -1.0),
    ("train.checkpoint_every_steps", -5), ("train.on_nonfinite", "ignore"),
    ("scenario.seed", -1), ("dataset.split_seed", -3), ("dataset.test_fraction", 1.5),
    ("num_devices", 0), ("host_devices", -1)])
def test_bad_values_are_refused_naming_the_field_before_anything_runs(tmp_path, field, value):
    c = tiny_config()
    section, _, key = field.rpartition(".")
    (c[section] if section else c)[key] = value
    with pytest.raises(ValueError, match=rf"config {field} must be .*--config\.{field}="):
        train_and_evaluate(c, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_an_eval_batch_that_does_not_split_over_the_devices_names_the_field(tmp_path):
    c = tiny_config()
    c.eval.batch_size = 12  # 8 simulated devices
    with pytest.raises(ValueError, match=r"eval.batch_size 12 .* 8 devices.*--config.eval.batch_size"):
        train_and_evaluate(c, str(tmp_path))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pecft_jax.run", *args], capture_output=True,
                          text=True, timeout=300)


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "experiments", "configs")


@pytest.mark.parametrize("args, message", [
    ([f"--config={CONFIGS}/missing.py"], r"No such file or directory: .*missing\.py"),
    ([f"--config={CONFIGS}/l2p.py", "--config.train.learning_rate=-1"],
     r"config train.learning_rate must be a finite number >= 0.*--config.train.learning_rate"),
    ([f"--config={CONFIGS}/l2p.py", "--config.train.epochz=3"], r"unknown config key 'epochz'"),
    (["--config={broken}"], r"NameError: name 'undefined_name' is not defined \(.*broken\.py, line 4\)"),
])
def test_cli_errors_are_one_line_naming_the_problem(tmp_path, args, message):
    broken = tmp_path / "broken.py"
    broken.write_text("import ml_collections\n\ndef get_config():\n    return undefined_name\n")
    args = [a.replace("{broken}", str(broken)) for a in args]
    done = _cli(*args, f"--workdir={tmp_path / 'w'}")
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-2].startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    assert re.search(message, lines[-2]), lines[-2]
    verbose = _cli(*args, f"--workdir={tmp_path / 'w'}", "--verbose")
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_a_key_misspelt_in_a_config_file_is_an_error_not_ignored(tmp_path):
    c = tiny_config()
    c.train.epochz = 3  # ml_collections creates it silently; nothing would read it
    with pytest.raises(ValueError, match=r"unknown config key 'train.epochz'.*'epochs'"):
        train_and_evaluate(c, str(tmp_path))
    c = tiny_config()
    c.dataset.test_split = "test[:50%]"  # optional keys the data code reads are fine
    c.dataset.test_fraction = 0.25
    c.dataset.split_seed = 7
    from pecft_jax.configs import check_run_config
    check_run_config(c)


def test_more_devices_than_there_are_names_the_field(tmp_path):
    c = tiny_config()
    c.num_devices = 9  # 8 simulated devices
    with pytest.raises(ValueError, match=r"num_devices=9, but 8 devices .*--config.num_devices"):
        train_and_evaluate(c, str(tmp_path))


@pytest.mark.parametrize("signum, status", [
    (signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])
def test_a_stop_signal_writes_a_checkpoint_and_the_rerun_resumes_exactly(tmp_path, signum,
                                                                         status):
    """SIGTERM (preemption notice) or Ctrl-C mid-task: the run writes a checkpoint at its
    next step, says so in one line and exits 128 + the signal; re-running the command
    finishes bit-identical to an uninterrupted run."""
    from test_fault_injection import _command, _config_file, _learning_records, _progress, _run
    config_file = _config_file(tmp_path)
    reference = _run(config_file, "l2p", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    workdir = tmp_path / "stopped"
    process = subprocess.Popen(_command(config_file, "l2p", workdir), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while _progress(workdir) < 3:  # inside the first task, a few steps checkpointed
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-3000:]
        time.sleep(0.01)
    process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    assert process.returncode == status, err[-3000:]
    name = signal.Signals(signum).name
    line = [x for x in err.splitlines() if x.startswith(f"stopped by {name}")]
    assert len(line) == 1 and "checkpoint latest/" in line[0] and "re-run" in line[0], err[-2000:]
    assert "Traceback" not in err and not (workdir / "results.json").exists()
    step = int(line[0].split("checkpoint latest/")[1].split()[0])
    assert step in [int(p) for p in os.listdir(workdir / "checkpoints" / "latest")]
    final = _run(config_file, "l2p", workdir)
    assert final.returncode == 0, final.stderr[-3000:]
    ours = json.load(open(workdir / "results.json"))
    theirs = json.load(open(tmp_path / "reference" / "results.json"))
    assert ours["accuracy_matrix"] == theirs["accuracy_matrix"]
    assert _learning_records(workdir) == _learning_records(tmp_path / "reference")
    assert_same_task_checkpoint(tmp_path / "reference", workdir, 1)


def test_dry_run_prints_the_plan_and_a_missing_workdir_is_named(tmp_path):
    done = _cli(f"--config={CONFIGS}/l2p.py:split_mnist", "--dry_run")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "class order: [0, 1, 2, 3" in done.stdout and "resolved config:" in done.stdout
    assert "   4 | 8, 9" in done.stdout  # the last task's row (tasks from 0)
    missing = _cli(f"--config={CONFIGS}/l2p.py:split_mnist")
    assert missing.returncode == 1 and "error: --workdir is required" in missing.stderr
