"""Fault injection (slow; ``make test-slow``): runs of the CLI killed with SIGKILL at
random moments -- start-up, gradient steps, evaluation, checkpoint writes (a checkpoint
after every step makes writes a large share of the run) -- and restarted, finish
bit-identical to an uninterrupted run, for a method of each family: prompts (L2P),
a first-session adapter with ridge statistics (RanPAC), LoRA with gradient projection
(InfLoRA), a shared adapter with drift compensation (SSIAT). Each file a run writes,
damaged afterwards, is either repaired by a re-run or refused with one line naming it."""
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ROOT, assert_same_task_checkpoint

pytestmark = pytest.mark.slow

OPTIONS = {
    "l2p": {},
    "ranpac": {"M": 64, "adapter": {"bottleneck_dim": 4}},
    "inflora": {},
    "ssiat": {"adapter": {"bottleneck_dim": 4}, "ca_samples": 16},
}
KILLS = 4

CONFIG_FILE = """
import sys
sys.path.insert(0, {tests!r})
from helpers import tiny_config

def get_config(arg):
    c = tiny_config(arg, **{options!r}[arg])
    c.scenario.num_tasks = 2
    c.num_devices = 2
    c.train.checkpoint_every_steps = 1  # most of the run is checkpoint writes
    c.compilation_cache_dir = {cache!r}  # restarts read the compiled programs
    return c
"""


def _config_file(tmp_path):
    path = tmp_path / "fault_config.py"
    path.write_text(CONFIG_FILE.format(tests=os.path.join(ROOT, "tests"), options=OPTIONS,
                                       cache=str(tmp_path / "xla_cache")))
    return path


def _command(config_file, method, workdir):
    return [sys.executable, "-m", "pecft_jax.run", "--config", f"{config_file}:{method}",
            "--workdir", str(workdir)]


def _run(config_file, method, workdir):
    done = subprocess.run(_command(config_file, method, workdir), capture_output=True,
                          text=True, cwd=ROOT, timeout=900)
    return done


def _learning_records(workdir):
    """metrics.jsonl without timings: what a resumed run must have logged identically."""
    records = []
    with open(workdir / "metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            records.append({k: v for k, v in record.items()
                            if k in ("step", "task") or "loss" in k or "accuracy" in k})
    return records


def _progress(workdir):
    """How far the checkpoints have got: 1 + the newest in-task checkpoint's step, plus
    1000 per finished task (0 before the first)."""
    root, best = workdir / "checkpoints", 0
    for kind, weight in (("latest", 1), ("tasks", 1000)):
        if (root / kind).is_dir():
            steps = [int(p) for p in os.listdir(root / kind) if p.isdigit()]
            best += weight * (max(steps) + 1) if steps else 0
    return best


def _results(workdir):
    with open(workdir / "results.json") as f:
        return json.load(f)


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_runs_killed_at_random_moments_resume_bit_identical(tmp_path, method):
    config_file = _config_file(tmp_path)
    started = time.time()
    reference = _run(config_file, method, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    whole_run = time.time() - started  # includes start-up and the first compilations

    rng = random.Random(method)
    workdir = tmp_path / "killed"
    log = []
    # the first kill at a random moment of start-up, at the latest when the first
    # checkpoint appears (the reference's duration is only a guide: on a loaded machine a
    # run may take far less); each later one once the run has written 1-3 more steps, plus
    # a random delay of up to 0.3 s: wherever the run is then -- a step, an evaluation, the
    # middle of a checkpoint write
    for attempt in range(KILLS):
        process = subprocess.Popen(_command(config_file, method, workdir), cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if attempt == 0:
            deadline, target = time.time() + rng.uniform(0.1, 0.5) * whole_run, 1
        else:
            deadline, target = time.time() + 600, _progress(workdir) + rng.randint(1, 3)
        while process.poll() is None and time.time() < deadline and (
                _progress(workdir) < target):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if process.poll() is not None:
            _, err = process.communicate()
            assert process.returncode == 0, f"{log}: {err[-3000:]}"
            log.append("finished before its kill")
            break
        before = _progress(workdir)
        process.kill()  # SIGKILL: no handler, no clean-up
        process.communicate()
        log.append(f"killed at progress {before}")
    final = _run(config_file, method, workdir)
    assert final.returncode == 0, f"{log}: {final.stderr[-3000:]}"
    print(method, log)
    # the schedule interrupted real work: kills after the run had written checkpoints
    assert sum(entry.startswith("killed") and not entry.endswith(" 0") for entry in log) >= 2, log

    ours, theirs = _results(workdir), _results(tmp_path / "reference")
    assert ours["accuracy_matrix"] == theirs["accuracy_matrix"], log
    assert ours["task_il_accuracy_matrix"] == theirs["task_il_accuracy_matrix"], log
    assert ours["train_steps"] == theirs["train_steps"]
    assert_same_task_checkpoint(tmp_path / "reference", workdir, 1)
    assert _learning_records(workdir) == _learning_records(tmp_path / "reference"), log


def test_damaged_run_files_are_rewritten_or_refused_naming_them(tmp_path):
    """After a finished run: a truncated results.json, a torn metrics.jsonl line and a
    garbled config.json are written again by a re-run, identical; a damaged latest
    checkpoint is refused in one line naming it and the checkpoint before it."""
    config_file = _config_file(tmp_path)
    workdir = tmp_path / "run"
    first = _run(config_file, "l2p", workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    results = _results(workdir)
    records = _learning_records(workdir)

    (workdir / "results.json").write_text("")
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 99999, "loss": 1.')  # a line torn by a crash
    (workdir / "config.json").write_text("{not json")
    again = _run(config_file, "l2p", workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _results(workdir)["accuracy_matrix"] == results["accuracy_matrix"]
    assert _learning_records(workdir) == records
    json.loads((workdir / "config.json").read_text())

    latest = max(int(p) for p in os.listdir(workdir / "checkpoints" / "tasks") if p.isdigit())
    damaged = 0
    for root, _, files in os.walk(workdir / "checkpoints" / "tasks" / str(latest)):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 64 and "metadata" not in name:
                data = bytearray(open(path, "rb").read())
                position = np.random.default_rng(0).integers(32, len(data))
                data[position] ^= 0xFF
                open(path, "wb").write(bytes(data))
                damaged += 1
    assert damaged
    refused = _run(config_file, "l2p", workdir)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, refused.stderr[-3000:]
    assert f"tasks/{latest}" in errors[0] and "damaged" in errors[0], errors[0]
