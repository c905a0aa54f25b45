"""The continual loop end to end on real (sklearn digits) data with a tiny random ViT."""
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pecft_jax.evaluate import evaluate_checkpoint
from pecft_jax.methods import TaskSpec, create_method
from pecft_jax.train.checkpoint import Checkpointer, CheckpointMismatch
from pecft_jax.train.loop import train_and_evaluate

from helpers import Interrupted, crash_at_training_batch, tiny_config, watch_training_batches


@pytest.fixture(scope="module")
def l2p_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("l2p"))
    results = train_and_evaluate(tiny_config(), workdir)
    return workdir, results


def test_results_file_has_the_documented_fields(l2p_run):
    workdir, results = l2p_run
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    for key in ("method", "dataset", "num_tasks", "accuracy_matrix", "task_il_accuracy_matrix",
                "metrics", "trainable_params", "seconds_per_task", "config"):
        assert key in saved, key
    matrix = saved["accuracy_matrix"]
    assert [len(row) for row in matrix] == [1, 2, 3, 4, 5]
    assert all(0.0 <= v <= 100.0 for row in matrix for v in row)
    assert saved["metrics"]["average_accuracy"] == pytest.approx(np.mean(matrix[-1]))
    assert set(saved["metrics"]) >= {"average_accuracy", "average_incremental_accuracy",
                                     "forgetting", "bwt"}
    # pool 6x2x32 prompts + 6x32 keys + a 10-class head on width 32
    assert saved["trainable_params"] == 6 * 2 * 32 + 6 * 32 + 32 * 10 + 10
    # task-IL is never below class-IL: restricting the argmax to the task can only help
    for ci, ti in zip(matrix, saved["task_il_accuracy_matrix"]):
        assert all(t >= c - 1e-9 for c, t in zip(ci, ti))
    assert os.path.exists(os.path.join(workdir, "metrics.jsonl"))
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    # the evaluation's extras: top-5 >= top-1 (100 while at most 5 classes are seen),
    # old/new-class accuracy pooling to the row's class-IL accuracy, the last confusion
    top5 = saved["class_il_top5_matrix"]
    assert all(t5 >= c - 1e-9 for r5, r in zip(top5, matrix) for t5, c in zip(r5, r))
    assert top5[1] == [100.0, 100.0]
    old_new = saved["old_new_class_il_matrix"]
    assert old_new[0][0] is None and old_new[0][1] == pytest.approx(matrix[0][0])
    confusion = saved["final_confusion_matrix"]
    counts = np.asarray(confusion["matrix"])
    assert confusion["classes"] == saved["class_order"] and counts.shape == (10, 10)
    per_task = counts.sum(axis=1).reshape(5, 2).sum(axis=1)  # test examples of each task
    assert np.trace(counts) / counts.sum() * 100 == pytest.approx(
        np.sum(np.asarray(matrix[-1]) * per_task) / per_task.sum())
    sizes = [int(x) for x in per_task[:4]]
    assert old_new[4][0] == pytest.approx(np.dot(matrix[4][:4], sizes) / sum(sizes))
    per_class = saved["final_per_class_accuracy"]
    c0 = str(saved["class_order"][0])
    assert per_class[c0] == pytest.approx(100 * counts[0, 0] / counts[0].sum())
    from PIL import Image  # every run draws its matrices
    with Image.open(os.path.join(workdir, "accuracy_matrix.png")) as image:
        assert image.size[0] > 300 and np.asarray(image.convert("L")).std() > 10


def test_a_five_task_run_compiles_one_train_and_one_eval_step(l2p_run):
    _, results = l2p_run
    report = results["compilation"]
    assert report["traces"] == {"train_step": 1, "eval_step": 1}, report
    # what XLA itself compiled (the task index is an input, not a constant)
    assert report["by_function"]["jit(train_step)"] == 1, report
    assert report["by_function"]["jit(eval_step)"] == 1, report
    assert report["xla_compilations"] == sum(report["by_function"].values()), report


def test_evaluate_reproduces_the_recorded_rows(l2p_run):
    workdir, results = l2p_run
    for task in (1, 4):
        out = evaluate_checkpoint(workdir, task)
        np.testing.assert_allclose(out["class_il"], results["accuracy_matrix"][task], atol=1e-9)
        np.testing.assert_allclose(out["task_il"], results["task_il_accuracy_matrix"][task],
                                   atol=1e-9)


def test_evaluate_on_training_data_and_exported_predictions(l2p_run):
    """--split train evaluates the tasks' training data; --predictions exports every
    example's task, label, prediction (original class ids) and logits, which give back the
    row's accuracies."""
    workdir, results = l2p_run
    test = evaluate_checkpoint(workdir, 2, predictions=True)
    train = evaluate_checkpoint(workdir, 2, split="train", predictions=True)
    assert "recorded_class_il" not in train and os.path.exists(
        os.path.join(workdir, "eval_task2_train.json"))
    for out, split in ((test, "test"), (train, "train")):
        with np.load(os.path.join(workdir, f"predictions_task2_{split}.npz")) as f:
            arrays = {k: f[k] for k in f.files}
        order = results["class_order"]
        assert arrays["seen_classes"].tolist() == order[:6]
        np.testing.assert_array_equal(
            arrays["prediction"], arrays["seen_classes"][np.argmax(arrays["logits"], axis=1)])
        for t in range(3):
            rows = arrays["task"] == t
            assert set(arrays["label"][rows].tolist()) == set(order[2 * t:2 * t + 2])
            accuracy = 100 * np.mean(arrays["prediction"][rows] == arrays["label"][rows])
            assert accuracy == pytest.approx(out["class_il"][t])
    assert len(np.load(os.path.join(workdir, "predictions_task2_train.npz"))["label"]) > \
        len(np.load(os.path.join(workdir, "predictions_task2_test.npz"))["label"])
    np.testing.assert_allclose(test["class_il"], results["accuracy_matrix"][2], atol=1e-9)


def test_checkpoints_do_not_contain_the_backbone(l2p_run):
    workdir, _ = l2p_run
    from pecft_jax.train.checkpoint import Checkpointer
    ckpt = Checkpointer(workdir)
    restored = ckpt.restore("tasks", 4)
    ckpt.close()
    assert set(restored["trainable"]) == {"prompts", "keys", "head"}
    assert restored["meta"]["fingerprint"]


def assert_rows_close(actual, expected, atol):
    """Accuracy matrices are lower-triangular (ragged) lists of rows."""
    assert [len(r) for r in actual] == [len(r) for r in expected]
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, atol=atol)


def test_interrupted_run_resumes_to_the_same_accuracy_matrix(l2p_run, tmp_path, monkeypatch):
    _, uninterrupted = l2p_run
    workdir = str(tmp_path)
    clock, real_time = {"offset": 0.0}, time.time

    def tick():  # each batch "takes" 100 s of the loop's clock
        clock["offset"] += 100.0
    # the 17th batch is inside task 2 (about 7 steps per task), after a checkpoint
    undo = crash_at_training_batch(monkeypatch, 17, each_batch=tick)
    monkeypatch.setattr(time, "time", lambda: real_time() + clock["offset"])
    with pytest.raises(Interrupted):
        train_and_evaluate(tiny_config(), workdir)
    undo()
    monkeypatch.setattr(time, "time", real_time)
    steps = sorted(os.listdir(os.path.join(workdir, "checkpoints", "latest")))
    assert steps, "a mid-task checkpoint should exist"
    ckpt = Checkpointer(workdir)
    _, step, meta = ckpt.latest()
    ckpt.close()
    assert not meta["task_done"] and meta["seconds_in_task"] >= 100.0
    # the checkpoint holds the grain iterator of the task's batches, at the checkpointed step
    assert meta["input_iterator"] == {"grain_state": {"next_index": meta["step_in_task"]},
                                      "start": 0, "processes": 0,
                                      "position": meta["step_in_task"]}
    resumed = train_and_evaluate(tiny_config(), workdir)
    assert_rows_close(resumed["accuracy_matrix"], uninterrupted["accuracy_matrix"], atol=1e-9)
    # the resumed process compiled its one train step once
    assert resumed["compilation"]["traces"]["train_step"] == 1
    # the interrupted task's time includes what it spent before the crash
    assert resumed["seconds_per_task"][meta["task"]] >= meta["seconds_in_task"]
    # metrics.jsonl holds each record once: what was logged after the checkpoint was dropped
    # and logged again (same steps, same values as the uninterrupted run's)
    def records(path):
        with open(os.path.join(path, "metrics.jsonl")) as f:
            return [{k: v for k, v in json.loads(line).items() if k != "train/examples_per_sec"}
                    for line in f]
    assert records(workdir) == records(l2p_run[0])


def test_the_train_steps_are_never_queued_far_ahead(tmp_path, monkeypatch):
    """Each task's steps go through ``compiler.bound_queue`` in order, with the step's
    health record (never donated, so it can be waited for), which waits every
    ``MAX_QUEUED_PROGRAMS`` steps: XLA:CPU deadlocked on long queues of data-parallel steps."""
    from pecft_jax import compiler
    seen, real = [], compiler.bound_queue

    def bound_queue(count, output):
        seen.append((count, output.shape, str(output.dtype)))
        return real(count, output)
    monkeypatch.setattr(compiler, "bound_queue", bound_queue)
    config = tiny_config()
    config.scenario.num_tasks = 2
    results = train_and_evaluate(config, str(tmp_path))
    steps = results["train_steps"] // 2
    assert steps > 1
    assert seen == 2 * [(n, (2,), "int32") for n in range(1, steps + 1)]


@pytest.mark.slow
def test_a_run_crashed_before_its_first_checkpoint_restarts_its_log(tmp_path, monkeypatch):
    """No checkpoint to resume from: the rerun starts over, and so does metrics.jsonl (the
    crashed attempt's records would otherwise be followed by the same steps again)."""
    config = tiny_config()
    config.scenario.num_tasks = 2
    config.train.log_every_steps = 1
    config.train.checkpoint_every_steps = 100
    undo = crash_at_training_batch(monkeypatch, 4)
    with pytest.raises(Interrupted):
        train_and_evaluate(config, str(tmp_path))
    undo()
    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.latest() is None
    ckpt.close()
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
    train_and_evaluate(config, str(tmp_path))
    with open(tmp_path / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f if '"train/loss"' in line]
    assert steps == sorted(set(steps)) and steps[:3] == [1, 2, 3]


@pytest.mark.slow
def test_a_resumed_run_without_gradient_steps_logs_each_evaluation_once(tmp_path,
                                                                        monkeypatch):
    """SimpleCIL takes no gradient steps: every task's evaluation is logged at global step
    0. A crash after task 2's evaluation was logged, before its checkpoint was written,
    resumes from task 1's checkpoint (step 0): task 2's row must not be logged twice."""
    from pecft_jax.train.checkpoint import Checkpointer as RealCheckpointer
    config = tiny_config("simplecil")
    reference = train_and_evaluate(config, str(tmp_path / "reference"))

    real_save = RealCheckpointer.save

    def crashing_save(self, *, task_end, step, **kwargs):
        if task_end and step == 2:
            raise Interrupted("killed before the checkpoint of task 2")
        return real_save(self, task_end=task_end, step=step, **kwargs)
    monkeypatch.setattr(RealCheckpointer, "save", crashing_save)
    with pytest.raises(Interrupted):
        train_and_evaluate(config, str(tmp_path / "run"))
    monkeypatch.setattr(RealCheckpointer, "save", real_save)
    resumed = train_and_evaluate(config, str(tmp_path / "run"))
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]

    def records(path):
        with open(path / "metrics.jsonl") as f:
            return [json.loads(line) for line in f]
    assert records(tmp_path / "run") == records(tmp_path / "reference")
    assert [r["task"] for r in records(tmp_path / "run")] == [0, 1, 2, 3, 4]


def test_a_run_diverging_mid_task_keeps_its_last_good_checkpoint(l2p_run, tmp_path,
                                                                 monkeypatch):
    """A batch of NaNs inside task 1, after a mid-task checkpoint: the run stops naming the
    task and the step, the checkpoint before stays the latest (finite), and the rerun on
    clean data resumes from it and ends as the uninterrupted run."""
    from pecft_jax.train.loop import NonFiniteError

    def poison(n, batch):  # task 1 (9 steps a task), step 4, after its checkpoint at 3
        nan = np.full(np.shape(batch["inputs"]), np.nan, np.float32)  # float32 inputs either way
        return dict(batch, inputs=nan) if n == 14 else batch
    undo = watch_training_batches(monkeypatch, poison)
    workdir = str(tmp_path)
    with pytest.raises(NonFiniteError, match=r"task 1 \(0-based\), step 4 of the task"):
        train_and_evaluate(tiny_config(), workdir)
    undo()
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    ckpt = Checkpointer(workdir)
    kind, step, meta = ckpt.latest()
    restored = ckpt.restore(kind, step)
    ckpt.close()
    assert (kind, meta["task"], meta["step_in_task"]) == ("latest", 1, 3)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(restored["trainable"]))
    resumed = train_and_evaluate(tiny_config(), workdir)
    assert_rows_close(resumed["accuracy_matrix"], l2p_run[1]["accuracy_matrix"], atol=1e-9)


def test_non_finite_values_after_a_task_stop_the_run_before_its_checkpoint(tmp_path,
                                                                          monkeypatch):
    from pecft_jax.methods.l2p import L2P
    from pecft_jax.train.loop import NonFiniteError
    real = L2P.after_task

    def after_task(self, task, trainable, state, *args):
        trainable, state = real(self, task, trainable, state, *args)
        if int(task.index) == 1:  # e.g. statistics divided by an empty class
            trainable = dict(trainable, head=jax.tree_util.tree_map(
                lambda x: x * np.nan, trainable["head"]))
        return trainable, state
    monkeypatch.setattr(L2P, "after_task", after_task)
    config = tiny_config()
    config.scenario.num_tasks = 2
    with pytest.raises(NonFiniteError, match=r"task 1 \(0-based\) ended with non-finite "
                                             r"values in .*head.* after its after_task"):
        train_and_evaluate(config, str(tmp_path))
    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.task_steps() == [0]  # task 1's values never reached a checkpoint
    ckpt.close()
    assert not os.path.exists(tmp_path / "results.json")


@pytest.mark.slow
def test_a_crash_inside_a_checkpoint_write_resumes_from_the_one_before(l2p_run, tmp_path,
                                                                       monkeypatch):
    """The process dies while orbax writes task 2's checkpoint, its arrays on disk but the
    commit (the rename of the temporary directory) not done: the half-written directory is
    what a kill at that moment leaves. The rerun resumes from the last complete checkpoint
    and ends as the uninterrupted run."""
    from orbax.checkpoint._src.path import atomicity
    real = atomicity.AtomicRenameTemporaryPath.finalize

    async def dies_before_the_commit(self, *args, **kwargs):
        if "tasks" in str(self.get_final()) and self.get_final().name == "2":
            raise Interrupted("killed inside the checkpoint write")
        return await real(self, *args, **kwargs)
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", dies_before_the_commit)
    workdir = str(tmp_path)
    with pytest.raises(Exception):
        train_and_evaluate(tiny_config(), workdir)
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", real)
    left = os.listdir(os.path.join(workdir, "checkpoints", "tasks"))
    assert any(name.startswith("2.") and "tmp" in name for name in left), left
    ckpt = Checkpointer(workdir)
    assert ckpt.task_steps() == [0, 1]
    ckpt.close()
    resumed = train_and_evaluate(tiny_config(), workdir)
    assert_rows_close(resumed["accuracy_matrix"], l2p_run[1]["accuracy_matrix"], atol=1e-9)


def test_one_device_and_eight_devices_give_the_same_matrix(l2p_run, tmp_path):
    _, eight = l2p_run
    config = tiny_config()
    config.num_devices = 1
    one = train_and_evaluate(config, str(tmp_path))
    # the same predictions: the parameters differ only by float rounding (the gradients'
    # cross-device sums run in another order; README's device-count table)
    assert one["accuracy_matrix"] == eight["accuracy_matrix"]


def test_resuming_with_another_config_or_backbone_fails_clearly(l2p_run, tmp_path):
    workdir, _ = l2p_run
    other = tiny_config()
    other.train.learning_rate = 0.5
    with pytest.raises(CheckpointMismatch, match="different config"):
        train_and_evaluate(other, workdir)
    other = tiny_config()
    other.seed = 1  # a different random backbone
    with pytest.raises(CheckpointMismatch, match="different backbone"):
        train_and_evaluate(other, workdir)
    other = tiny_config()
    other.num_devices = 4  # would continue only to float rounding: refused, naming the fix
    with pytest.raises(CheckpointMismatch, match=r"8 devices in 1 process.*this one has 4 in 1"
                                                 r".*--config.num_devices=8"):
        train_and_evaluate(other, workdir)


def test_unknown_method_dataset_and_bad_split_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'l3p'"):
        train_and_evaluate(tiny_config("l3p"), str(tmp_path / "a"))
    config = tiny_config()
    config.dataset.name = "cifar1000"
    with pytest.raises(ValueError, match="cifar1000"):
        train_and_evaluate(config, str(tmp_path / "b"))
    config = tiny_config()
    config.scenario.num_tasks = 3  # 10 classes do not split into 3 equal tasks
    with pytest.raises(ValueError, match="num_tasks|divisible|split"):
        train_and_evaluate(config, str(tmp_path / "c"))
    config = tiny_config()
    config.train.batch_size = 36  # not a multiple of the 8 devices
    with pytest.raises(ValueError, match="divisible"):
        train_and_evaluate(config, str(tmp_path / "d"))


def test_l2p_masks_classes_outside_the_current_task():
    """With L2P's training mask, the head's columns of other tasks get no gradient."""
    config = tiny_config()
    trainer_free = config.method
    from pecft_jax.backbones.backbone import load_backbone
    backbone, frozen = load_backbone("random:ViT-Micro/4")
    method = create_method("l2p", trainer_free, backbone, 10, 5)
    trainable, state = method.init(jax.random.key(0), frozen)
    task = TaskSpec(index=1, num_classes=10,
                    task_classes=((0, 1), (2, 3), (4, 5), (6, 7), (8, 9)))
    batch = {"inputs": jax.random.normal(jax.random.key(1), (8, 16, 16, 1)),
             "label": jnp.array([2, 3] * 4)}
    grads = jax.grad(lambda t: method.loss(t, state, frozen, batch, jax.random.key(2), task)[0])(
        trainable)
    bias_grad = np.asarray(grads["head"]["bias"])
    # the loop traces the task index (one program for every task): the same gradients
    traced = jax.jit(jax.grad(lambda t, task: method.loss(t, state, frozen, batch,
                                                          jax.random.key(2), task)[0]))
    for leaf, expected in zip(jax.tree_util.tree_leaves(traced(trainable, task)),
                              jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(leaf, expected, rtol=1e-5, atol=1e-7)
    assert np.all(bias_grad[[0, 1, 4, 5, 6, 7, 8, 9]] == 0.0)
    assert np.all(np.abs(bias_grad[[2, 3]]) > 0.0)
    # keys receive the matching loss' gradient; the frozen backbone is not an argument
    assert np.abs(np.asarray(grads["keys"])).sum() > 0
    # the logged training accuracy is over the classes the loss sees (here 2 and 3)
    _, aux = method.loss(trainable, state, frozen, batch, jax.random.key(2), task)
    logits = np.asarray(method._forward(trainable, state, frozen, batch, True)[0])
    expected = np.mean(np.array([2, 3])[logits[:, [2, 3]].argmax(1)] == np.asarray(batch["label"]))
    assert float(aux["metrics"]["accuracy"]) == pytest.approx(expected)


@pytest.mark.parametrize("options,joint", [({"mode": "full"}, False),
                                           ({"mode": "head"}, False),
                                           ({"mode": "lora"}, False),
                                           ({"mode": "head"}, True)])
def test_baselines_run_end_to_end(tmp_path, options, joint):
    config = tiny_config("finetune", **options)
    config.scenario.num_tasks = 2
    config.scenario.joint = joint  # the joint upper bound is a scenario option
    results = train_and_evaluate(config, str(tmp_path))
    assert results["joint"] is joint
    if joint:
        assert len(results["accuracy_matrix"]) == 1 and len(results["accuracy_matrix"][0]) == 2
        assert results["metrics"]["forgetting"] is None
    else:
        assert [len(r) for r in results["accuracy_matrix"]] == [1, 2]
    if options["mode"] == "head":
        assert results["trainable_params"] == 32 * 10 + 10


def test_corrupt_checkpoint_fails_with_a_clear_error(l2p_run, tmp_path):
    import shutil
    workdir = str(tmp_path / "copy")
    shutil.copytree(l2p_run[0], workdir)
    arrays_dir = os.path.join(workdir, "checkpoints", "tasks", "4", "arrays")
    for root, _, files in os.walk(arrays_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(CheckpointMismatch, match=r"tasks/4 .* is damaged: unreadable.*tasks/3"):
        evaluate_checkpoint(workdir, 4)


def test_tensorboard_logging_does_not_import_torch(tmp_path):
    """tensorboardX imports torch whenever it is installed (seconds of start-up); the writer
    keeps it out, and the event file still holds the scalars (read back as TFRecords)."""
    script = f"""
import json, os, sys
from pecft_jax.train.logging_utils import MetricWriter
w = MetricWriter({str(tmp_path)!r})
w.write(3, {{'loss': 0.5}})
w.close()
assert 'torch' not in sys.modules
from tensorboardX.proto import event_pb2
folder = os.path.join({str(tmp_path)!r}, 'tensorboard')
[name] = os.listdir(folder)
data = open(os.path.join(folder, name), 'rb').read()
values, offset = [], 0
while offset < len(data):  # length (8 bytes), its crc (4), the event, its crc (4)
    length = int.from_bytes(data[offset:offset + 8], 'little')
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    values += [[event.step, v.tag, v.simple_value] for v in event.summary.value]
    offset += 16 + length
print(json.dumps(values))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [[3, "loss", 0.5]]


def test_a_dry_run_plans_the_run_from_shapes_and_writes_nothing(l2p_run, tmp_path):
    """--dry_run: the class order, tasks, epochs, steps and parameter counts a run would
    have (the real run's figures), nothing trained, no file written."""
    from pecft_jax.train.loop import plan_run
    _, results = l2p_run
    config = tiny_config()
    before = set(os.listdir(tmp_path))
    plan = plan_run(config)
    assert set(os.listdir(tmp_path)) == before
    assert plan["class_order"] == results["class_order"]
    assert [t["classes"] for t in plan["tasks"]] == \
        [results["class_order"][2 * t:2 * t + 2] for t in range(5)]
    assert sum(t["steps"] for t in plan["tasks"]) == results["train_steps"]
    assert plan["trainable_params"] == results["trainable_params"]
    assert plan["devices"] == 8 and plan["config"]["method"]["name"] == "l2p"


def test_logs_hold_the_learning_rate_task_averages_config_and_hparams(tmp_path):
    """metrics.jsonl / TensorBoard: the base learning rate of each logged step's update
    (here a per-step cosine), the class-IL and task-IL averages after each task; the
    config as text and an HParams summary in the event files."""
    import optax
    from tensorboardX.proto import event_pb2
    config = tiny_config()
    config.scenario.num_tasks = 2
    config.train.schedule = "cosine"
    config.train.log_every_steps = 5
    config.train.checkpoint_every_steps = 0
    results = train_and_evaluate(config, str(tmp_path))
    steps = results["train_steps"] // 2
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    rates = [(r["step"], r["task"], r["train/learning_rate"]) for r in records
             if "train/learning_rate" in r]
    assert len(rates) >= 4
    cosine = optax.cosine_decay_schedule(0.01, steps)
    for step, task, rate in rates:
        assert rate == pytest.approx(float(cosine(step - task * steps - 1)), rel=1e-5)
    evals = [r for r in records if "eval/average_accuracy" in r]
    for r, row, task_row in zip(evals, results["accuracy_matrix"],
                                results["task_il_accuracy_matrix"]):
        assert r["eval/average_accuracy"] == pytest.approx(np.mean(row))
        assert r["eval/task_il_average_accuracy"] == pytest.approx(np.mean(task_row))

    def events(folder):
        out = []
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if os.path.isdir(path):
                out += events(path)
                continue
            data, offset = open(path, "rb").read(), 0
            while offset < len(data):
                length = int.from_bytes(data[offset:offset + 8], "little")
                out.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
                offset += 16 + length
        return out

    values = [v for e in events(str(tmp_path / "tensorboard")) for v in e.summary.value]
    tags = {v.tag for v in values}
    assert "config/text_summary" in tags and "train/learning_rate" in tags
    text = next(v for v in values if v.tag == "config/text_summary")
    assert '"learning_rate": 0.01' in text.tensor.string_val[0].decode()
    plugins = {v.metadata.plugin_data.plugin_name for v in values}
    assert "hparams" in plugins
