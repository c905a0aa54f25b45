"""Evaluation on tasks not learnt yet (eval.future_tasks) and forward transfer from a
reference row the loop computes before any task (eval.fwt_reference='init')."""
import numpy as np
import pytest

from pecft_jax.train.checkpoint import Checkpointer
from pecft_jax.train.loop import train_and_evaluate

from helpers import Interrupted, crash_at_training_batch, tiny_config


def _config(method="l2p", future=True, reference="init", tasks=3):
    c = tiny_config(method)
    c.scenario.num_tasks = tasks
    c.scenario.first_task_classes = 4  # the digits' 10 classes: 4, 3, 3
    c.eval.future_tasks = future
    c.eval.fwt_reference = reference
    return c


def _fwt(matrix, reference):
    """GEM's FWT, recomputed here: mean over j >= 1 of R[j-1][j] - b_j."""
    return float(np.mean([matrix[j - 1][j] - reference[j] for j in range(1, len(matrix))]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fwt")
    future = train_and_evaluate(_config(), str(root / "future"))
    plain = train_and_evaluate(_config(future=False, reference=""), str(root / "plain"))
    future["workdir"], plain["workdir"] = str(root / "future"), str(root / "plain")
    return future, plain


def test_future_entries_add_to_the_matrix_and_change_nothing_learnt(runs):
    future, plain = runs
    for key in ("accuracy_matrix", "task_il_accuracy_matrix"):
        assert [len(row) for row in future[key]] == [3, 3, 3]
        assert [len(row) for row in plain[key]] == [1, 2, 3]
        # evaluation only: the learnt part is the plain run's, bit for bit
        assert [row[:t + 1] for t, row in enumerate(future[key])] == plain[key]
    for key in ("average_accuracy", "average_incremental_accuracy", "forgetting", "bwt"):
        assert future["metrics"][key] == plain["metrics"][key]
    assert "fwt" not in plain["metrics"] and "reference_accuracy" not in plain


def test_evaluate_re_scores_future_tasks_from_a_checkpoint(runs):
    """The plain run's task-0 checkpoint, re-evaluated on every task, gives the row the
    future-evaluating run recorded (the two trained alike); a run that recorded future
    tasks is re-evaluated on them by default."""
    from pecft_jax.evaluate import evaluate_checkpoint
    future, plain = runs
    again = evaluate_checkpoint(plain["workdir"], task=0, future_tasks=True)
    assert again["class_il"] == future["accuracy_matrix"][0]
    assert again["task_il"] == future["task_il_accuracy_matrix"][0]
    recorded = evaluate_checkpoint(future["workdir"], task=1)
    assert recorded["class_il"] == recorded["recorded_class_il"]
    assert len(recorded["class_il"]) == 3


def test_fwt_is_gem_formula_on_the_reference_row(runs):
    future, _ = runs
    reference = future["reference_accuracy"]
    assert len(reference["class_il"]) == len(reference["task_il"]) == 3
    assert future["metrics"]["fwt"] == pytest.approx(
        _fwt(future["accuracy_matrix"], reference["class_il"]), abs=1e-9)
    assert future["task_il_metrics"]["fwt"] == pytest.approx(
        _fwt(future["task_il_accuracy_matrix"], reference["task_il"]), abs=1e-9)


def test_a_model_that_learns_nothing_has_zero_forward_transfer(tmp_path):
    """No gradient steps and no statistics: the model after every task is the one before
    any, so every future entry equals the reference (the same model scored over the same
    classes) and FWT is exactly 0."""
    c = _config("finetune")
    c.train.epochs = 0
    results = train_and_evaluate(c, str(tmp_path))
    reference = results["reference_accuracy"]
    for t, row in enumerate(results["task_il_accuracy_matrix"]):
        assert row == reference["task_il"], t  # nothing learnt: task-IL never changes
    for t, row in enumerate(results["accuracy_matrix"]):
        assert row[t + 1:] == reference["class_il"][t + 1:]
    assert results["metrics"]["fwt"] == 0.0 and results["task_il_metrics"]["fwt"] == 0.0
    assert max(reference["task_il"]) > 0  # a real evaluation, not an empty one


@pytest.mark.slow
def test_the_reference_survives_a_resume(runs, tmp_path, monkeypatch):
    future, _ = runs
    # two steps before the end: inside the last task, after one of its checkpoints
    undo = crash_at_training_batch(monkeypatch, future["train_steps"] - 1)
    with pytest.raises(Interrupted):
        train_and_evaluate(_config(), str(tmp_path))
    undo()
    ckpt = Checkpointer(str(tmp_path))
    _, _, meta = ckpt.latest()
    ckpt.close()
    assert (meta["task"], meta["task_done"]) == (2, False)
    assert meta["reference_accuracy"] == future["reference_accuracy"]
    resumed = train_and_evaluate(_config(), str(tmp_path))
    assert resumed["reference_accuracy"] == future["reference_accuracy"]
    assert resumed["accuracy_matrix"] == future["accuracy_matrix"]
    assert resumed["metrics"]["fwt"] == future["metrics"]["fwt"]


def test_bad_fwt_settings_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="fwt_reference needs eval.future_tasks=True"):
        train_and_evaluate(_config(future=False), str(tmp_path))
    c = _config()
    c.scenario.joint = True
    with pytest.raises(ValueError, match="no task lies in the future"):
        train_and_evaluate(c, str(tmp_path))
    with pytest.raises(ValueError, match="eval.fwt_reference must be"):
        train_and_evaluate(_config(reference="linear"), str(tmp_path))


def test_the_new_eval_keys_at_their_defaults_leave_the_config_hash_as_it_was():
    """Checkpoints written before eval.future_tasks / eval.fwt_reference existed still
    resume: at their defaults the keys are not part of the config hash; set, they are."""
    from pecft_jax.train.loop import config_hash
    config = tiny_config()
    older = tiny_config()
    del older.eval["future_tasks"], older.eval["fwt_reference"]
    assert config_hash(config) == config_hash(older)
    assert config_hash(_config()) != config_hash(config)


def test_a_method_that_masks_unlearnt_classes_refuses_future_tasks(tmp_path):
    with pytest.raises(ValueError, match="lae: its logits mask the classes of tasks not learnt"):
        train_and_evaluate(_config("lae"), str(tmp_path))
