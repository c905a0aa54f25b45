"""A run of SSIAT, EASE or LAE -- methods whose before_task writes what the steps or
after_task need (the adapter before the task; a fresh temporary classifier; the offline
copy), LAE with an optimizer group that starts late -- resumed from a checkpoint inside a
task ends bit-identical to the uninterrupted run."""
import pytest

from helpers import assert_crashed_run_resumes_bit_identical, tiny_config


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
    # task 1, after its step-6 checkpoint
    assert_crashed_run_resumes_bit_identical(
        monkeypatch, tmp_path, lambda: _config(method),
        lambda whole: whole["train_steps"] // 2 + 8)
