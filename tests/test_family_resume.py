"""A run of SSIAT, EASE or LAE -- methods whose before_task writes what the steps or
after_task need (the adapter before the task; a fresh temporary classifier; the offline
copy), LAE with an optimizer group that starts late -- resumed from a checkpoint inside a
task ends bit-identical to the uninterrupted run."""
import pytest

from pecft_jax.train.loop import train_and_evaluate

from helpers import Interrupted, assert_same_task_checkpoint, crash_at_training_batch, tiny_config


def _config(method):
    c = (tiny_config(method, layers=(0, 1)) if method == "lae"  # task 1: the module waits
         else tiny_config(method, adapter={"bottleneck_dim": 4}))
    c.scenario.num_tasks = 2
    c.train.optimizer, c.train.momentum, c.train.weight_decay = "sgd", 0.9, 5e-4
    if method == "ssiat":
        c.method.ca_samples = 16
    return c


@pytest.mark.parametrize("method", ["ssiat", "ease", "lae"])
@pytest.mark.slow
def test_resume_inside_the_second_task_is_bit_identical(method, tmp_path, monkeypatch):
    whole = train_and_evaluate(_config(method), str(tmp_path / "whole"))
    first_task_steps = whole["train_steps"] // 2
    # task 1, after its step-6 checkpoint
    undo = crash_at_training_batch(monkeypatch, first_task_steps + 8)
    with pytest.raises(Interrupted):
        train_and_evaluate(_config(method), str(tmp_path / "resumed"))
    undo()
    resumed = train_and_evaluate(_config(method), str(tmp_path / "resumed"))
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert_same_task_checkpoint(tmp_path / "whole", tmp_path / "resumed", 1)
