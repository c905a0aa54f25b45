"""Multi-process runs from the config alone: two processes on localhost (two simulated CPU
devices each) against one process with four devices; a lost process fails its peer, and
both restarted resume the run exactly."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from pecft_jax.configs import distributed_settings, one_process
from pecft_jax.evaluate import evaluate_checkpoint
from pecft_jax.train.checkpoint import Checkpointer
from pecft_jax.train.loop import train_and_evaluate

from helpers import tiny_config

TESTS = os.path.dirname(os.path.abspath(__file__))


def _config(method="l2p", method_options=None, **distributed):
    c = tiny_config(method, **(method_options or {}))
    c.scenario.num_tasks = 2
    for key, value in distributed.items():
        c.distributed[key] = value
    return c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir, port, process_id, num_processes=2, devices=2, method="l2p",
            method_options=None):
    script = f"""
import json, sys
sys.path.insert(0, {TESTS!r})
from test_multihost import _config
from pecft_jax.train.loop import train_and_evaluate
c = _config({method!r}, {method_options!r}, coordinator_address="localhost:{port}",
            num_processes={num_processes}, process_id={process_id})
results = train_and_evaluate(c, {workdir!r})
print("RESULT " + json.dumps(results["accuracy_matrix"]))
"""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _communicate(proc, timeout=600):
    """The process's output; a process still running after ``timeout`` is killed (it would
    hold its port and a core for the rest of the suite)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise


def _params(workdir, task):
    ckpt = Checkpointer(workdir)
    try:
        return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
                jax.tree_util.tree_leaves_with_path(ckpt.restore("tasks", task)["trainable"])}
    finally:
        ckpt.close()


def test_distributed_settings_from_the_config_and_the_environment(monkeypatch):
    assert distributed_settings(_config()) is None
    assert distributed_settings(_config(enabled=True)) == {"heartbeat_timeout_seconds": 10}
    got = distributed_settings(_config(coordinator_address="h:1", num_processes=4, process_id=3))
    assert got == {"coordinator_address": "h:1", "num_processes": 4, "process_id": 3,
                   "heartbeat_timeout_seconds": 10}
    with pytest.raises(ValueError, match="also set --config.distributed.num_processes"):
        distributed_settings(_config(coordinator_address="h:1"))
    with pytest.raises(ValueError, match=r"process_id must be in \[0, num_processes=2\)"):
        distributed_settings(_config(coordinator_address="h:1", num_processes=2, process_id=2))
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert distributed_settings(_config(coordinator_address="h:1"))["process_id"] == 1
    # JAX's three variables alone start a multi-process run (as README says they may)
    assert distributed_settings(_config()) is None
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "h:2")
    assert distributed_settings(_config()) == {
        "coordinator_address": "h:2", "num_processes": 2, "process_id": 1,
        "heartbeat_timeout_seconds": 10}
    # ... but never for `evaluate`, which reads a run's checkpoints in one process
    assert distributed_settings(one_process(_config(enabled=True))) is None
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    # a config.json written before `distributed` became a group
    old = tiny_config()
    del old["distributed"]
    old.distributed = True
    assert distributed_settings(old) == {}


def test_a_launcher_that_initialised_jax_distributed_itself_is_not_initialised_again(
        monkeypatch):
    from pecft_jax.train import mesh

    def initialize(**kwargs):
        raise RuntimeError("jax.distributed.initialize should only be called once")
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    mesh.initialise_distributed(coordinator_address="h:1", num_processes=2, process_id=0)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="only be called once"):
        mesh.initialise_distributed(coordinator_address="h:1", num_processes=2, process_id=0)


def _run_two_processes(workdir, **method):
    """Both processes of a run to the end; the accuracy matrix they agree on."""
    port = _free_port()
    procs = [_launch(workdir, port, i, **method) for i in range(2)]
    outputs = []
    for proc in procs:
        out, err = _communicate(proc)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.split("RESULT ", 1)[1]))
    assert outputs[0] == outputs[1]  # both processes computed the same run
    return outputs[0]


def _launch_until_checkpointed(workdir):
    """Both processes of a run, returned once it has written a checkpoint inside task 0."""
    import time
    port = _free_port()
    procs = [_launch(workdir, port, i) for i in range(2)]
    deadline = time.time() + 300
    inside = os.path.join(workdir, "checkpoints", "latest")
    while not (os.path.isdir(inside) and any(p.isdigit() for p in os.listdir(inside))):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    return procs


def _assert_restart_ends_as(workdir, two_process_run):
    """Both processes restarted on ``workdir`` end as the uninterrupted run: its accuracy
    matrix, and every task checkpoint's parameters bit for bit."""
    reference, matrix = two_process_run
    assert _run_two_processes(workdir) == matrix
    for task in (0, 1):
        ours, theirs = _params(workdir, task), _params(reference, task)
        assert sorted(ours) == sorted(theirs)
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("two"))
    return workdir, _run_two_processes(workdir)


@pytest.mark.slow
def test_two_processes_match_one_process_with_as_many_devices(tmp_path, two_process_run):
    """Bit for bit when the one process also reduces across its devices through JAX's
    cross-process collectives (a one-process distributed run: every device is a gloo rank,
    as in the two-process run); to float rounding through the in-process all-reduce."""
    workdir, matrix = two_process_run
    two_params = _params(workdir, 1)

    gloo = str(tmp_path / "gloo")
    proc = _launch(gloo, _free_port(), 0, num_processes=1, devices=4)
    out, err = _communicate(proc)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out.split("RESULT ", 1)[1]) == matrix
    for task in (0, 1):
        ours, theirs = _params(gloo, task), _params(workdir, task)
        assert sorted(ours) == sorted(theirs)
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)

    one = _config()
    one.num_devices = 4
    single = train_and_evaluate(one, str(tmp_path / "one"))
    assert single["accuracy_matrix"] == matrix
    # parameters to float rounding (measured: 3.0e-8 to 2.4e-7 absolute on this test's
    # arrays): the in-process all-reduce sums the devices' gradients in another order than
    # gloo's ring. (Both exact checks depend on jaxlib's reduction orders: a JAX upgrade
    # may change them; a flaky failure is not expected on one version.)
    for key, value in _params(str(tmp_path / "one"), 1).items():
        np.testing.assert_allclose(two_params[key], value, rtol=1e-5, atol=1e-7, err_msg=key)

    # one process evaluates the two-process run's checkpoint (the config says distributed)
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["distributed"]["coordinator_address"].startswith("localhost:")
    row = evaluate_checkpoint(workdir, 1)
    np.testing.assert_allclose(row["class_il"], row["recorded_class_il"], atol=1e-9)


@pytest.mark.slow
def test_statistics_passes_and_one_device_solves_across_processes(tmp_path):
    """RanPAC over two processes (two devices each) -- per-device Gram sums added across
    the processes once (``TaskData.reduce(additive=True)``), the ridge solves on each
    process's own first device, the head kept on the host -- equals one process with four
    devices."""
    method = {"method": "ranpac", "method_options": {"M": 64, "first_session": "none"}}
    matrix = _run_two_processes(str(tmp_path / "two"), **method)
    one = _config(**method)
    one.num_devices = 4
    single = train_and_evaluate(one, str(tmp_path / "one"))
    assert single["accuracy_matrix"] == matrix
    heads = [Checkpointer(str(tmp_path / run)) for run in ("two", "one")]
    try:
        two_state, one_state = (np.asarray(c.restore("tasks", 1)["state"]["head"])
                                for c in heads)
    finally:
        for c in heads:
            c.close()
    scale = np.abs(one_state).max()
    assert scale > 0
    # to float rounding of the Gram sums (added in another order), which the ridge solve
    # amplifies (measured: 3.1e-6 at most, the head's largest entry 3.4e-2)
    np.testing.assert_allclose(two_state, one_state, rtol=1e-3, atol=1e-3 * scale)


@pytest.mark.slow
def test_a_lost_process_fails_the_other_within_seconds_and_a_restart_resumes(
        tmp_path, two_process_run):
    """kill -9 one process of a two-process run inside the first task: the other must not
    hang (JAX's default heartbeat timeout is 100 s; the config's 10 s makes it fail within
    seconds); both restarted resume from the last checkpoint and end as the uninterrupted
    run, bit for bit."""
    import signal
    import time
    workdir = str(tmp_path)
    procs = _launch_until_checkpointed(workdir)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    try:
        procs[0].communicate(timeout=90)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("the surviving process still ran 90 s after its peer was killed")
    took = time.time() - killed
    assert procs[0].returncode != 0
    print(f"the surviving process exited {took:.1f} s after its peer was killed")
    assert took < 60, took
    assert not os.path.exists(os.path.join(workdir, "results.json"))

    _assert_restart_ends_as(workdir, two_process_run)


@pytest.mark.slow
def test_a_stop_signal_to_one_process_checkpoints_both_and_a_restart_resumes(
        tmp_path, two_process_run):
    """SIGTERM to one process of two: they agree at the next logged step (a collective),
    write the checkpoint together and both stop naming it; restarted, they end as the
    uninterrupted run, bit for bit."""
    import signal
    workdir = str(tmp_path)
    procs = _launch_until_checkpointed(workdir)
    procs[1].send_signal(signal.SIGTERM)
    errors = []
    for proc in procs:  # (the launcher is a script: the CLI would exit 143)
        _, err = proc.communicate(timeout=300)
        errors.append(err)
        assert proc.returncode != 0 and "Preempted: stopped by SIGTERM" in err, err[-3000:]
    # the same step in both, its checkpoint written once by both together
    steps = {err.split("Preempted: stopped by SIGTERM ")[1].split(";")[0] for err in errors}
    assert len(steps) == 1, steps
    assert not os.path.exists(os.path.join(workdir, "results.json"))

    _assert_restart_ends_as(workdir, two_process_run)
