"""``host_devices``: a CPU host presented to XLA as several devices, one batch shard each."""
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from pecft_jax.train import mesh as mesh_lib

TESTS = os.path.dirname(os.path.abspath(__file__))
FLAG = "--xla_force_host_platform_device_count"


@pytest.mark.parametrize("xla_flags,message", [
    (f"{FLAG}=8", "host_devices=2 not applied: XLA_FLAGS sets 8 CPU device(s)"),
    (f"--xla_cpu_enable_fast_math=false {FLAG}=2", ""),  # the same count: nothing to say
    ("", "host_devices=2 not applied: JAX had started before this run, with 8 cpu"),
])
def test_a_count_that_cannot_apply_is_said(monkeypatch, caplog, xla_flags, message):
    assert jax.local_device_count() == 8  # JAX started (the suite's 8 simulated devices)
    monkeypatch.setenv("XLA_FLAGS", xla_flags)
    with caplog.at_level(logging.WARNING, logger=mesh_lib.__name__):
        mesh_lib.split_host(2)
    assert (message in caplog.text) if message else not caplog.text
    assert jax.config.jax_num_cpu_devices == -1  # nothing changed
    assert os.environ["XLA_FLAGS"] == xla_flags


def test_the_users_jax_num_cpu_devices_wins(monkeypatch, caplog):
    monkeypatch.setattr(mesh_lib, "user_cpu_device_count", lambda: (4, "jax_num_cpu_devices"))
    with caplog.at_level(logging.WARNING, logger=mesh_lib.__name__):
        mesh_lib.split_host(2)
    assert "host_devices=2 not applied: jax_num_cpu_devices sets 4 CPU device(s)" in caplog.text


def test_zero_leaves_jax_alone(monkeypatch, caplog):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    with caplog.at_level(logging.WARNING, logger=mesh_lib.__name__):
        mesh_lib.split_host(0)
    assert not caplog.text and jax.config.jax_num_cpu_devices == -1


def _fresh_env():
    """A child process's environment without the tests' 8 forced devices: its own split
    applies."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(workdir, host_devices):
    script = f"""
import json, sys
sys.path.insert(0, {TESTS!r})
from helpers import tiny_config
from pecft_jax.train.loop import train_and_evaluate
c = tiny_config()
c.scenario.num_tasks = 2
c.host_devices = {host_devices}
r = train_and_evaluate(c, {str(workdir)!r})
print("RESULT " + json.dumps([r["layout"], r["accuracy_matrix"]]))
"""
    done = subprocess.run([sys.executable, "-c", script], env=_fresh_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_a_run_in_a_fresh_process_splits_the_host(tmp_path):
    split_layout, split = _run(tmp_path / "split", 2)
    one_layout, one = _run(tmp_path / "one", 0)
    assert split_layout == {"devices": 2, "processes": 1, "platform": "cpu"}
    assert one_layout == {"devices": 1, "processes": 1, "platform": "cpu"}
    # the same run on another layout: equal to float rounding (README: device counts)
    np.testing.assert_allclose(np.asarray(split[-1]), np.asarray(one[-1]), atol=2.0)


def test_the_image_demos_split_the_host_in_two_and_nothing_else_does():
    """A fixed count (not the host's cores), so a demo computes the same on every machine;
    the paper benchmarks and the text demos keep XLA's one device."""
    from pecft_jax.configs import benchmark
    assert benchmark("split_mnist").host_devices == 2
    assert benchmark("domain_mnist").host_devices == 2
    for name in ("cifar100", "imagenet_r", "5datasets", "wordnet", "vader", "text_sequence"):
        assert benchmark(name).host_devices == 0, name


@pytest.mark.slow
def test_the_step_benchmark_splits_the_host_for_every_method_it_splits():
    """benchmark_step's worker must split the host before it builds the method: building
    HiDe-Prompt starts JAX (an eval_shape), after which the split no longer applies."""
    root = os.path.dirname(TESTS)
    for method, options in (("hide_prompt", ["prompt_layers=[0, 1]", "prompt_length=2"]),
                            ("l2p", ["top_k=1"])):
        command = [sys.executable, os.path.join(root, "experiments", "benchmark_step.py"),
                   "--worker", "jax", "--method", method, "--arch", "ViT-Micro/4",
                   "--batch-size", "8", "--steps", "1", "--threads", "1",
                   "--host-devices", "2"] + [a for o in options for a in ("--set", o)]
        done = subprocess.run(command, env=_fresh_env(), capture_output=True, text=True,
                              timeout=600, cwd=root)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["devices"] == 2, method
