"""experiments/gpu_session.py: the prepared command for a lent GPU (its plan, its budget, the
fallback from cuDNN's attention, what it writes), checked on a CPU."""
import importlib.util
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    path = os.path.join(ROOT, "experiments", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def session():
    return _load("gpu_session")


def _report(name):
    """A benchmark_step.py output: progress lines, then its report from ``command:`` on."""
    return (f"  round 1 jax  10.0 ms wall\ncommand: python experiments/benchmark_step.py "
            f"{name}\n  jax  100.0 images/s\n  speed-up jax vs PyTorch eager: 1.50x\n")


class FakeMachine:
    """A runner and a clock: each command takes ``seconds[i]`` and answers ``answers[i]``
    (exit status, output), in order, its output streamed to the item's file as the real
    runner does; ``summaries`` keeps summary.md as each command found it."""

    def __init__(self, answers, seconds):
        self.answers, self.seconds, self.now = list(answers), list(seconds), 0.0
        self.commands, self.timeouts, self.summaries = [], [], []

    def clock(self):
        return self.now

    def run(self, command, timeout, path):
        self.commands.append(command)
        self.timeouts.append(timeout)
        with open(os.path.join(os.path.dirname(path), "summary.md")) as f:
            self.summaries.append(f.read())
        self.now += self.seconds.pop(0)
        status, output = self.answers.pop(0)
        with open(path, "w") as f:
            f.write(output)
        return status, output


def test_every_planned_item_is_a_command_benchmark_step_accepts(session, monkeypatch):
    """Each item's arguments pass benchmark_step.py's own checks (method, architecture,
    options), so no item of a GPU session fails on a typo; the full plan measures ViT-B/16
    at batch 128 under bf16 and cuDNN attention, as its docstring says."""
    bench = _load("benchmark_step")
    started = []
    monkeypatch.setattr(bench, "step_mode", started.append)
    monkeypatch.setattr(bench, "demo_mode", started.append)
    for quick, with_torch in ((False, True), (True, True), (True, False)):
        items = session.plan(quick, with_torch)
        names = [item.name for item in items]
        assert len(set(names)) == len(names)
        assert names[:2] == ["environment", "attention_parity"]
        assert ("l2p_demo" in names) is not quick
        timed = [item for item in items if item.kind == "benchmark"]
        assert len(timed) == len(items) - 2
        for item in timed:
            monkeypatch.setattr("sys.argv", ["benchmark_step.py"] + list(item.args))
            bench.main()
        torch_items = [args for args in started[-len(timed):]
                       if "torch" in args.variants.split(",")]
        assert len(torch_items) == (4 if not quick else 3 if with_torch else 0)
    full = {item.name: started[i] for i, item in enumerate(session.plan(False)[2:])}
    for name in ("l2p", "coda_prompt", "ranpac"):
        args = full[name]
        assert (args.mode, args.method, args.arch, args.batch_size, args.dtype,
                args.attention) == ("step", name, "ViT-B/16", 128, "bfloat16", "cudnn")
        assert "torch" in args.variants.split(",")
    assert full["ranpac"].set == []  # the Config's M = 10,000, the paper's
    assert full["l2p_xla_attention"].attention == "xla"
    assert full["l2p_demo"].mode == "demo" and full["l2p_demo"].warm_cache


def test_session_writes_each_item_and_a_summary_of_their_reports(session, tmp_path):
    items = session.plan(quick=True)
    machine = FakeMachine([(0, "jax 0.11\n"), (0, "bf16 cudnn 1e-2\n")]
                          + [(0, _report(i.name)) for i in items[2:]], [1.0] * len(items))
    status = session.run_session(items, str(tmp_path), 100.0, machine.run, machine.clock)
    assert status == 0
    assert machine.commands[0][1:] == ["-c", session.ENVIRONMENT]
    assert machine.commands[1][1].endswith("gpu_session.py")
    assert machine.commands[1][2:] == ["--parity", "ViT-Demo/7", "8"]
    assert all(c[1].endswith("benchmark_step.py") for c in machine.commands[2:])
    summary = (tmp_path / "summary.md").read_text()
    assert "## attention_parity\n\n````\nbf16 cudnn 1e-2\n````" in summary
    # before each item the summary names it as under way, the later ones as not started
    assert "- l2p: under way when the summary was written" in machine.summaries[2]
    assert "- ranpac: not started (budget spent)" in machine.summaries[2]
    for item in items[2:]:
        assert (tmp_path / f"{item.name}.txt").read_text() == _report(item.name)
        # the report from its command line on, not the progress lines
        assert f"benchmark_step.py {item.name}\n" in summary
    assert "round 1" not in summary and "jax 0.11" in summary
    assert "not measured" not in summary


def test_an_item_whose_cudnn_attention_fails_runs_again_on_xla_attention(session, tmp_path):
    """A JAX worker that fails under cuDNN's attention: the item runs again on XLA's, its
    report is kept, and the session says so with status 1 (no cuDNN figure was measured).
    A PyTorch worker's failure is not cuDNN's: no retry."""
    item = session.Item("l2p", "benchmark", ("--method", "l2p", "--attention", "cudnn"))
    refused = "jax worker failed:\nRuntimeError: cuDNN is not detected."
    machine = FakeMachine([(1, refused), (0, _report("l2p"))], [1.0, 1.0])
    assert session.run_session([item], str(tmp_path), 100.0, machine.run, machine.clock) == 1
    assert machine.commands[0][-2:] == ["--attention", "cudnn"]
    assert machine.commands[1][-2:] == ["--attention", "xla"]
    text = (tmp_path / "l2p.txt").read_text()
    assert text.startswith("cuDNN attention failed (exit status 1); XLA's attention instead")
    assert "cuDNN is not detected" in text and text.endswith(_report("l2p"))
    summary = (tmp_path / "summary.md").read_text()
    assert "cuDNN attention failed" in summary and "speed-up jax" in summary
    assert "- l2p: cuDNN's attention failed; measured with XLA's instead" in summary

    machine = FakeMachine([(1, "torch worker failed:\nCUDA out of memory")], [1.0])
    assert session.run_session([item], str(tmp_path), 100.0, machine.run, machine.clock) == 1
    assert len(machine.commands) == 1
    assert "- l2p: exit status 1 (its output: l2p.txt)" in \
        (tmp_path / "summary.md").read_text()
    machine = FakeMachine([(1, refused), (None, "partial")], [1.0, 1.0])
    assert session.run_session([item], str(tmp_path), 100.0, machine.run, machine.clock) == 1
    assert "- l2p: timed out (the retry on XLA's attention)" in \
        (tmp_path / "summary.md").read_text()


def test_budget_spent_timed_out_and_failed_items_are_listed_and_the_status_is_1(
        session, tmp_path):
    """Each item gets what is left of the budget (less the reserve for writing); once it is
    spent the rest are not started; a timed-out item (status None) and a failure are
    named in the summary, with what they printed kept in their files."""
    items = [session.Item(name, "benchmark", ("--method", name, "--attention", "xla"))
             for name in ("a", "b", "c", "d")]
    machine = FakeMachine([(0, _report("a")), (None, "partial"), (2, "Traceback: boom")],
                          [10.0, 40.0, 30.0])
    status = session.run_session(items, str(tmp_path), 100.0, machine.run, machine.clock,
                                 reserve_s=20.0)
    assert status == 1
    assert machine.timeouts == [80.0, 70.0, 30.0]  # then 100 - 80 - 20 = 0 s: d not started
    assert len(machine.commands) == 3 and not (tmp_path / "d.txt").exists()
    assert (tmp_path / "b.txt").read_text() == "partial"
    assert (tmp_path / "c.txt").read_text() == "Traceback: boom"  # no cuDNN: no retry
    summary = (tmp_path / "summary.md").read_text()
    assert "## a" in summary and "## b" not in summary
    for line in ("- b: timed out (its output: b.txt)", "- c: exit status 2 (its output: c.txt)",
                 "- d: not started (budget spent)"):
        assert line in summary


def _attention_with_wrong_gradients(scale_dq=1.0, scale_dk=1.0, scale_out=1.0):
    """XLA's attention with its output or its query / key gradients scaled: the kind of
    kernel error the parity check is there to catch."""
    import jax
    exact = jax.nn.dot_product_attention

    def correct(q, k, v):
        return exact(q, k, v, implementation="xla")

    @jax.custom_vjp
    def attention(q, k, v):
        return scale_out * correct(q, k, v)

    def backward(inputs, cotangent):
        dq, dk, dv = jax.vjp(correct, *inputs)[1](cotangent)
        return scale_dq * dq, scale_dk * dk, dv
    attention.defvjp(lambda q, k, v: (attention(q, k, v), (q, k, v)), backward)
    return lambda q, k, v, **options: attention(q, k, v)


@pytest.mark.parametrize("wrong", [None, dict(scale_out=1.02), dict(scale_dq=1.1),
                                   dict(scale_dq=0.0), dict(scale_dk=0.5)])
@pytest.mark.slow
def test_attention_parity_passes_xla_attention_and_fails_wrong_kernels(session, monkeypatch,
                                                                       capsys, wrong):
    """The parity item's check passes XLA's dot_product_attention in bf16 and fails a kernel
    whose output is 2% off, or whose query or key gradients are wrong while its output is
    right (the check compares them one by one, on peaked attention)."""
    import jax
    if wrong is not None:
        monkeypatch.setattr(jax.nn, "dot_product_attention",
                            _attention_with_wrong_gradients(**wrong))
    assert session.attention_parity("ViT-Micro/4", 4) == (0 if wrong is None else 1)
    out = capsys.readouterr().out
    assert "xla     attention: output" in out
    assert ("FAILED: xla: an error exceeds" in out) is (wrong is not None)


@pytest.mark.parametrize("off", [0.0, 1e-3])
def test_the_uint8_pixels_check_passes_the_lookup_and_fails_a_normalisation_off_by_little(
        session, monkeypatch, capsys, off):
    """The parity item's uint8 check: the features on device-normalised pixels equal those on
    the host's inputs (here, XLA:CPU: identical); a device normalisation 0.1% off fails."""
    import jax
    from pecft_jax.backbones import backbone as backbone_lib, vit
    if off:
        normalise = backbone_lib.Backbone.normalise
        monkeypatch.setattr(backbone_lib.Backbone, "normalise",
                            lambda self, x: normalise(self, x) * (1 + off))
    cfg = vit.get_config("ViT-Micro/4", num_classes=0, num_layers=2)
    params = vit.init_params(cfg, jax.random.key(0))
    assert session.uint8_pixels_check(cfg, params, 4) == (1 if off else 0)
    out = capsys.readouterr().out
    assert ("features identical" in out) is (not off)
    assert "to the device: uint8" in out
    assert ("FAILED: uint8 pixels" in out) is bool(off)


def test_a_timed_out_command_is_stopped_with_the_processes_it_started(session, tmp_path):
    """benchmark_step.py runs its steps in worker processes: a timeout must stop those
    too, or they would hold the GPU while the next item runs."""
    parent = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "print('worker', child.pid, flush=True)\n"
              "time.sleep(60)\n")
    status, output = session.run_command([sys.executable, "-c", parent], 3.0,
                                         str(tmp_path / "a.txt"))
    assert status is None and output.startswith("worker ")
    worker = int(output.split()[1])
    for _ in range(50):  # killed: gone, or a zombie until its new parent reaps it
        try:
            with open(f"/proc/{worker}/status") as f:
                state = next(line for line in f if line.startswith("State:"))
        except (FileNotFoundError, ProcessLookupError):
            break
        if "Z" in state.split()[1]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"worker {worker} still runs: {state}")
    assert (tmp_path / "a.txt").read_text() == output  # streamed to the item's file
    assert session.run_command([sys.executable, "-c", "import sys; print('out', flush=True); "
                                "print('err', file=sys.stderr); sys.exit(3)"], 30.0,
                               str(tmp_path / "b.txt")) == (3, "out\nerr\n")
    assert not session._running


def test_session_refuses_bad_options_before_anything_runs(session, capsys):
    for argv, message in ((["--only", "l2p,nope"], "--only: no item nope"),
                          (["--budget-s", "0"], "--budget-s must be > 0")):
        with pytest.raises(SystemExit) as exit_info:
            session.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_quick_session_runs_on_this_cpu_and_falls_back_from_cudnn(tmp_path):
    """The real command at toy sizes on a CPU, as before a GPU is spent on it: cuDNN's
    attention is refused here, so the item runs again on XLA's and reports its step (with
    PyTorch's where PyTorch is installed; CI has none), and the status is 1."""
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "gpu_session.py"), "--quick",
         "--only", "environment,attention_parity,ranpac", "--out", str(tmp_path),
         "--budget-s", "500"],
        capture_output=True, text=True, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT))
    summary = (tmp_path / "summary.md").read_text()
    ranpac = (tmp_path / "ranpac.txt").read_text()
    assert "cuDNN attention failed" in ranpac and "--attention xla" in ranpac
    assert "ranpac step, ViT-Demo/7, batch 8, bfloat16, attention xla" in summary
    assert "jax devices:" in summary
    # the bf16 attention and ViT, einsum and XLA's attention, against float32; no cuDNN
    assert "einsum  attention: output" in summary and "xla     attention: output" in summary
    assert "cudnn: not run (the backend is cpu, not a GPU)" in summary
    # no cuDNN figure was measured, and the session says so: that and nothing else
    not_measured = summary.split("## not measured\n\n")[1].strip().splitlines()
    assert not_measured == ["- ranpac: cuDNN's attention failed; measured with XLA's "
                            "instead (its output: ranpac.txt)"]
    assert done.returncode == 1 and summary in done.stdout  # printed too
