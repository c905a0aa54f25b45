"""The performance issue's accelerator measurements as one prepared command, for a lent GPU.

A GPU machine is lent to a session for minutes (the ``device`` tool: one command of at most
10 minutes, 15 minutes of device time in all, the machine's start included), so what it
should measure is fixed here, tested on a CPU, and run in one call:

    make gpu-wheels                       # here: the wheels the GPU image lacks, into .whl/
    # the device tool's run: command "bash experiments/gpu_session.sh", carry [".whl"]

Each item below is a run of ``experiments/benchmark_step.py`` (separate processes, the JAX
step and its eager PyTorch port alternating; on a GPU it adds XLA's FLOPs per step, the
MFU against the card's bf16 peak and the peak device memory), in this order, within
``--budget-s`` seconds (560 by default: the device tool's 600 a command, less the wheels'
installation and a margin):

1. ``environment``: the GPU, JAX's and PyTorch's versions and devices;
2. ``attention_parity``: a random two-block ViT-B/16's bf16 forward and gradient with
   cuDNN's fused attention and XLA's against the float32 reference
   (:func:`attention_parity`), and its float32 features on the input pipeline's uint8
   pixels against the host-normalised inputs (:func:`uint8_pixels_check`) -- the
   accelerator path's numbers checked before they are timed;
3. ``l2p``, ``coda_prompt``: a ViT-B/16 training step at batch 128 with bf16 activations
   and matmuls (float32 parameters and optimizer) and cuDNN's fused attention
   (``jax.nn.dot_product_attention``), the frozen query computed in the step and passed in
   the batch (``jax-cached``), against PyTorch eager under bf16 autocast -- the models and
   the batch size of the official Split CIFAR-100 runs (L2P: ViT-B/16 at 16 per device on
   8 devices, ``l2p/configs/cifar100_l2p.py``; CODA-Prompt's
   ``configs/cifar-100_prompt.yaml``: 128);
4. ``ranpac``: RanPAC's phase-2 statistics pass over a batch of 128 on the frozen ViT-B/16
   (M = 10,000, the paper's);
5. ``l2p_xla_attention``: item 3's JAX step (the query in the step) with XLA's attention
   instead of cuDNN's;
6. ``l2p_demo``: the L2P Split MNIST demo end to end on the GPU, cold and warm compilation
   cache, against the PyTorch step loop at the demo's shapes.

An item whose JAX worker fails under cuDNN's attention (an older cuDNN, a shape it does not
take) runs again with ``--attention xla``. Each item's output streams to
``OUT/<item>.txt``; ``OUT/summary.md``, rewritten before and after every item, gathers the
reports and lists what was not measured as planned -- an item that failed, ran out of
time, fell back to XLA's attention, was under way or was not started for want of budget
-- and the exit status is then 1 (what did finish still comes back). The summary is also
printed at the end; a timeout, an error or a SIGTERM stops the item's processes with it.

Where PyTorch is not installed, the items time the JAX side alone. ``--quick`` runs the
same items at toy sizes (ViT-Demo/7, batch 8, 2 timed steps, no demo): the check, on a
CPU, that the command works before a GPU is spent on it.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from typing import Callable, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARK = os.path.join(ROOT, "experiments", "benchmark_step.py")

# what the environment item prints: versions, devices, the card
ENVIRONMENT = """
import importlib.metadata, platform, subprocess, sys
print("python", sys.version.split()[0], platform.platform())
try:
    print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                         timeout=30).stdout.strip())
except (OSError, subprocess.TimeoutExpired) as error:
    print("nvidia-smi:", error)
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "torch"):
    try:
        print(name, importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        print(name, "not installed")
import jax
print("jax devices:", jax.devices())
try:
    from jax._src.lib import cuda_versions  # private: present with JAX's CUDA plugin
    print("cuDNN", cuda_versions.cudnn_get_version())
except Exception as error:
    print("cuDNN: unknown here", type(error).__name__)
try:
    import torch
    print("torch cuda", torch.version.cuda,
          torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
except ImportError:
    pass
"""


@dataclasses.dataclass(frozen=True)
class Item:
    """One measurement: ``kind`` is ``'benchmark'`` (``args`` for benchmark_step.py),
    ``'parity'`` (``args``: the architecture and batch of :func:`attention_parity`) or
    ``'environment'``."""
    name: str
    kind: str
    args: Tuple[str, ...] = ()


def plan(quick: bool, with_torch: bool = True) -> List[Item]:
    """The items, in the order they run (the issue's figures first); the PyTorch side only
    ``with_torch`` (where PyTorch is installed)."""
    if quick:
        arch, batch, steps = "ViT-Demo/7", "8", "2"
    else:
        arch, batch, steps = "ViT-B/16", "128", "30"
    size = ("--arch", arch, "--batch-size", batch, "--steps", steps, "--rounds", "1")
    fast = ("--dtype", "bfloat16", "--attention", "cudnn")
    both = ("--variants", "jax,jax-cached,torch" if with_torch else "jax,jax-cached")
    items = [Item("environment", "environment"),
             Item("attention_parity", "parity", (arch, "8" if quick else "32")),
             Item("l2p", "benchmark", ("--method", "l2p") + both + size + fast),
             Item("coda_prompt", "benchmark", ("--method", "coda_prompt") + both + size + fast),
             # the paper's M = 10,000 (the Config's default); a toy run projects to 64
             Item("ranpac", "benchmark", ("--method", "ranpac") + both + size + fast
                  + (("--set", "M=64") if quick else ()))]
    items.append(Item("l2p_xla_attention", "benchmark", ("--method", "l2p", "--variants", "jax")
                      + size + ("--dtype", "bfloat16", "--attention", "xla")))
    if not quick:
        items.append(Item("l2p_demo", "benchmark", (
            "--mode", "demo", "--method", "l2p", "--warm-cache", "--rounds", "1",
            "--variants", "jax,torch" if with_torch else "jax")))
    return items


def attention_parity(arch: str, batch: int) -> int:
    """Each attention in bf16 -- the einsum, XLA's ``dot_product_attention``, cuDNN's where
    the backend is a GPU -- against the float32 einsum at full matmul precision, twice:

    * the operation alone at ``arch``'s shapes (tokens, heads, head width), its output and
      the gradients of queries, keys and values each compared on their own, the queries at
      4x the keys' scale so that the attention is peaked (at random initialisation it is
      near uniform, and wrong query or key gradients would hardly show);
    * a random two-block ``arch`` ViT through the library's ``backbone.attention`` switch:
      the [CLS] features and the gradient of their mean square for every weight.

    A fused attention passes when each of its relative errors is at most twice the bf16
    einsum's plus 1e-3 (it rounds in other places, so its errors differ, not by much).
    Prints the errors; returns 1 if one fails."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from pecft_jax.backbones import vit

    backend = jax.default_backend()
    impls = ["einsum", "xla"] + (["cudnn"] if backend == "gpu" else [])

    def relative(got, reference):
        return [float(np.linalg.norm(g - r) / np.linalg.norm(r))
                for g, r in zip(got, reference)]

    def einsum_attention(q, k, v):  # the ViT's 'einsum' path: its softmax in float32
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)

    def fused(impl):
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl)

    cfg = vit.get_config(arch, num_classes=0)
    shape = (batch, (cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.num_heads, cfg.head_dim)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, cotangent = (jax.random.normal(key, shape) for key in keys)
    q = 4.0 * q

    def operation(attention, dtype):
        def run(q, k, v, cotangent):
            out, vjp = jax.vjp(attention, *(x.astype(dtype) for x in (q, k, v)))
            return (out,) + vjp(cotangent.astype(out.dtype))
        return [np.asarray(x, np.float64) for x in jax.jit(run)(q, k, v, cotangent)]

    # the architecture's widths, heads and tokens in two blocks, at a fraction of the compile
    two_blocks = vit.get_config(arch, num_classes=0, num_layers=2)
    params = jax.jit(vit.init_params, static_argnums=0)(two_blocks, jax.random.key(1))
    images = jax.random.normal(jax.random.key(2), (batch, cfg.image_size, cfg.image_size,
                                                   cfg.num_channels))

    def model(config):
        def loss(p):
            cls = vit.apply(config, p, images, output="cls")
            return jnp.mean(jnp.square(cls)), cls
        (_, cls), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return [np.asarray(cls, np.float64),
                np.concatenate([np.asarray(g, np.float64).ravel()
                                for g in jax.tree_util.tree_leaves(grad)])]

    with jax.default_matmul_precision("highest"):
        references = (operation(einsum_attention, jnp.float32), model(two_blocks))
    print(f"{arch}, batch {batch}, backend {backend}: relative errors of bf16 against the "
          f"float32 einsum attention")
    errors = {}
    for impl in impls:
        attention = einsum_attention if impl == "einsum" else fused(impl)
        errors[impl] = (relative(operation(attention, jnp.bfloat16), references[0])
                        + relative(model(two_blocks.replace(dtype="bfloat16", attention=impl)),
                                   references[1]))
        e = errors[impl]
        print(f"  {impl:7s} attention: output {e[0]:.2e}, d/dq {e[1]:.2e}, d/dk {e[2]:.2e}, "
              f"d/dv {e[3]:.2e};  ViT: features {e[4]:.2e}, weight gradients {e[5]:.2e}")
    if "cudnn" not in impls:
        print(f"  cudnn: not run (the backend is {backend}, not a GPU)")
    failed = [impl for impl in impls[1:]
              if any(e > 2 * b + 1e-3 for e, b in zip(errors[impl], errors["einsum"]))]
    for impl in failed:
        print(f"  FAILED: {impl}: an error exceeds twice the bf16 einsum's plus 1e-3")
    return 1 if failed or uint8_pixels_check(two_blocks, params, batch) else 0


def uint8_pixels_check(cfg, params, batch: int) -> int:
    """The input pipeline's uint8 batches (``Preprocess.pixels``) on this backend: the
    float32 ViT's [CLS] features on uint8 pixels, normalised on the device by
    ``Backbone.apply``, against the same pixels normalised on the host (bit for bit on
    XLA:CPU; the inputs are the same values everywhere, and a fused program could still
    round the features otherwise), and the time to put a batch of each on the device.
    Returns 1 if the features differ by more than float32 rounding."""
    import jax
    import numpy as np
    from pecft_jax.backbones.backbone import Backbone
    from pecft_jax.data import Preprocess, preprocess_images

    mean, std = (0.485, 0.456, 0.406)[:cfg.num_channels], (0.229, 0.224, 0.225)[:cfg.num_channels]
    backbone = Backbone(cfg, mean, std)
    shape = (batch, cfg.image_size, cfg.image_size, cfg.num_channels)
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    host = preprocess_images(pixels, Preprocess(image_size=cfg.image_size,
                                                channels=cfg.num_channels, mean=mean, std=std))
    features = jax.jit(lambda p, x: backbone.apply(p, x, output="cls"))
    on_device, from_host = (np.asarray(features(params, x), np.float64) for x in (pixels, host))
    error = float(np.linalg.norm(on_device - from_host) / np.linalg.norm(from_host))

    def put_ms(array):  # median of 5 transfers to the first device
        times = []
        for _ in range(5):
            started = time.perf_counter()
            jax.block_until_ready(jax.device_put(array, jax.devices()[0]))
            times.append(1e3 * (time.perf_counter() - started))
        return sorted(times)[2]
    print(f"  uint8 pixels normalised on the device against the host's float32 inputs: "
          f"features {'identical' if error == 0 else f'relative error {error:.2e}'}; "
          f"a batch {shape} to the device: uint8 {put_ms(pixels):.2f} ms, float32 "
          f"{put_ms(host):.2f} ms")
    if error > 1e-6:
        print("  FAILED: uint8 pixels: the features differ by more than float32 rounding")
        return 1
    return 0


def with_xla_attention(args: Sequence[str]) -> Tuple[str, ...]:
    """``args`` with ``--attention cudnn`` replaced by ``--attention xla``."""
    out = list(args)
    for i, value in enumerate(out[:-1]):
        if value == "--attention" and out[i + 1] == "cudnn":
            out[i + 1] = "xla"
    return tuple(out)


def report(output: str) -> str:
    """The part of benchmark_step.py's output after its ``command:`` line (its report)."""
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("command:")]
    return "\n".join(lines[starts[-1]:]) if starts else output.strip()


# (command, timeout in seconds, file its output streams to) -> (exit status, output);
# None as the status: timed out
Runner = Callable[[List[str], float, str], Tuple[Optional[int], str]]

_running: List[subprocess.Popen] = []  # the command under way, stopped if the session dies


def stop_running() -> None:
    """Kills the command under way with the processes it started (benchmark_step.py's
    workers), which would otherwise hold the GPU after this session ends."""
    while _running:
        process = _running.pop()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_command(command: List[str], timeout: float, path: str) -> Tuple[Optional[int], str]:
    """Runs ``command`` in a process group of its own, its output streaming to ``path`` (what
    a session killed mid-item leaves); a timeout stops the group, workers included."""
    with open(path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                   start_new_session=True)
        _running.append(process)
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            stop_running()
    with open(path, errors="replace") as log:
        return status, log.read()


def command_for(item: Item) -> List[str]:
    if item.kind == "environment":
        return [sys.executable, "-c", ENVIRONMENT]
    if item.kind == "parity":
        return [sys.executable, os.path.abspath(__file__), "--parity"] + list(item.args)
    return [sys.executable, BENCHMARK] + list(item.args)


def jax_worker_failed(output: str) -> bool:
    """Whether benchmark_step.py stopped because a JAX worker failed (as a refused cuDNN
    attention does), not a PyTorch one or the script itself."""
    return re.search(r"^jax(-cached)? worker failed", output, re.MULTILINE) is not None


def run_session(items: Sequence[Item], out: str, budget_s: float,
                runner: Runner = run_command, clock: Callable[[], float] = time.monotonic,
                reserve_s: float = 20.0) -> int:
    """Runs ``items`` in order until ``budget_s`` is spent, each item given what is left
    less ``reserve_s`` (a margin before the device tool's own limit), writing
    ``out/<item>.txt`` and ``out/summary.md`` (which names the item under way, so a session
    killed mid-item says where). Returns 0 if every item was measured as planned, else 1."""
    os.makedirs(out, exist_ok=True)
    deadline = clock() + budget_s
    sections, problems = [], []

    def write_summary(pending: Sequence[Item], running: str = "") -> None:
        lines = ["# GPU session (experiments/gpu_session.py)", ""]
        for name, body in sections:  # four backticks: an output may hold three
            lines += [f"## {name}", "", "````", body, "````", ""]
        left = problems + ([f"{running}: under way when the summary was written "
                            f"(its output so far: {running}.txt)"] if running else [])
        left += [f"{item.name}: not started (budget spent)" for item in pending]
        if left:
            lines += ["## not measured", ""] + [f"- {p}" for p in left] + [""]
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write("\n".join(lines))

    for index, item in enumerate(items):
        remaining = deadline - clock() - reserve_s
        if remaining <= 0:
            write_summary(items[index:])
            return 1
        write_summary(items[index + 1:], running=item.name)
        print(f"[{item.name}] up to {remaining:.0f} s", flush=True)
        path = os.path.join(out, f"{item.name}.txt")
        status, output = runner(command_for(item), remaining, path)
        note, retried = "", False
        if (status not in (0, None) and item.kind == "benchmark" and "cudnn" in item.args
                and jax_worker_failed(output)):
            remaining = deadline - clock() - reserve_s
            if remaining > 0:  # cuDNN's attention refused: the same item on XLA's
                note = (f"cuDNN attention failed (exit status {status}); XLA's attention "
                        f"instead. The failure's end:\n{output[-1500:]}\n\n")
                retried = True
                status, output = runner(command_for(dataclasses.replace(
                    item, args=with_xla_attention(item.args))), remaining, path)
        with open(path, "w") as f:
            f.write(note + output)
        again = " (the retry on XLA's attention)" if retried else ""
        if status == 0:
            sections.append((item.name, note + (report(output) if item.kind == "benchmark"
                                                 else output.strip())))
            if retried:
                problems.append(f"{item.name}: cuDNN's attention failed; measured with XLA's "
                                f"instead (its output: {item.name}.txt)")
        else:
            why = "timed out" if status is None else f"exit status {status}"
            problems.append(f"{item.name}: {why}{again} (its output: {item.name}.txt)")
        print(output[-2000:], flush=True)
        write_summary(items[index + 1:])
    return 1 if problems else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_out",
                        help="where the items' outputs and summary.md go (default $OUT)")
    parser.add_argument("--budget-s", type=float, default=560.0,
                        help="seconds for all items (the device tool allows 600 a command)")
    parser.add_argument("--quick", action="store_true",
                        help="toy sizes, no demo: check the command on a CPU")
    parser.add_argument("--only", default="",
                        help="comma-separated item names to run (default: all)")
    parser.add_argument("--parity", nargs=2, metavar=("ARCH", "BATCH"),
                        help="run the attention_parity item's check alone")
    args = parser.parse_args(argv)
    if args.parity:
        return attention_parity(args.parity[0], int(args.parity[1]))
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    with_torch = importlib.util.find_spec("torch") is not None
    if not with_torch:
        print("PyTorch is not installed: the JAX side alone", flush=True)
    items = plan(args.quick, with_torch)
    if args.only:
        names = [n for n in args.only.split(",") if n]
        unknown = sorted(set(names) - {item.name for item in items})
        if unknown:
            parser.error(f"--only: no item {', '.join(unknown)}; the items: "
                         f"{', '.join(item.name for item in items)}")
        items = [item for item in items if item.name in names]
    # a SIGTERM (the device tool's limit) unwinds through the finally: the item's workers go
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        status = run_session(items, args.out, args.budget_s)
    finally:
        stop_running()
    with open(os.path.join(args.out, "summary.md")) as f:
        print(f.read())  # also in the command's output, should the files not come back
    return status


if __name__ == "__main__":
    sys.exit(main())
