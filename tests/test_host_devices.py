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


@pytest.mark.parametrize("before,inside", [
    (None, f"{FLAG}=2"),
    ("--xla_cpu_enable_fast_math=false", f"--xla_cpu_enable_fast_math=false {FLAG}=2"),
    (f"{FLAG}=8", f"{FLAG}=8"),  # the user's own count wins
])
def test_the_flag_is_set_for_the_start_of_jax_only(monkeypatch, caplog, before, inside):
    started = jax.local_device_count()  # the suite's 8 simulated devices, before the block
    if before is None:
        monkeypatch.delenv("XLA_FLAGS", raising=False)
    else:
        monkeypatch.setenv("XLA_FLAGS", before)
    with caplog.at_level(logging.WARNING, logger=mesh_lib.__name__):
        with mesh_lib.split_host(2):
            assert os.environ.get("XLA_FLAGS") == inside
    assert os.environ.get("XLA_FLAGS") == before  # child processes see the user's value
    # JAX had started in this process before the block: said, not silently ignored
    assert f"host_devices=2 not applied: JAX had started with {started} CPU" in caplog.text


def test_zero_leaves_xla_alone(monkeypatch, caplog):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    with caplog.at_level(logging.WARNING, logger=mesh_lib.__name__):
        with mesh_lib.split_host(0):
            assert "XLA_FLAGS" not in os.environ
    assert not caplog.text


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
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_a_run_in_a_fresh_process_splits_the_host(tmp_path):
    split_layout, split = _run(tmp_path / "split", 2)
    one_layout, one = _run(tmp_path / "one", 0)
    assert split_layout == {"devices": 2, "processes": 1, "platform": "cpu"}
    assert one_layout == {"devices": 1, "processes": 1, "platform": "cpu"}
    # the same run on another layout: equal to float rounding (README: device counts)
    np.testing.assert_allclose(np.asarray(split[-1]), np.asarray(one[-1]), atol=2.0)
