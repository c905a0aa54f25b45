"""One method's training step, pecft_jax (jit) against an eager PyTorch port of the same
step (``experiments/torch_ports.py``), timed as alternating separate processes on a shared
machine.

    python experiments/benchmark_step.py --method l2p --arch ViT-Demo/7 --batch-size 64
    python experiments/benchmark_step.py --method dualprompt --arch ViT-S/16 --batch-size 8
    python experiments/benchmark_step.py --mode demo --method l2p   # a whole demo run

Protocol (``--mode step``): every round starts one fresh process per variant, in turn
(jax, jax-cached, torch, jax, jax-cached, torch, ...), so a burst of load from other jobs
hits every variant alike instead of one. Each process builds the step, runs warm-up steps
(compilation excluded), then times ``--steps`` steps one by one, waiting for each result:
wall time and the process's CPU time (all its threads). Reported: the median over rounds
of each process's median step, the spread across rounds, the load average around each
process, the machine, and the ratios. ``jax-cached`` passes the frozen backbone's query in
the batch, as the loop does for un-augmented data (``feature_cache``).

The JAX side is the library's own step: ``method.update`` through the routed optimizer,
jit-compiled with donated buffers, the task index an input -- what the loop runs. The
PyTorch side re-implements the same computation (same shapes, same prompts, same loss
terms, Adam) in eager PyTorch the way the official PyTorch code does it, both in float32;
``--threads`` sets PyTorch's intra-op threads (XLA:CPU's pool uses every core; on this
project's 2-core VM the default, the core count, gives both the same). ``--host-devices 2``
splits the host into two XLA devices with the batch sharded over them, as
``--config.host_devices=2`` does in a run (PyTorch keeps its ``--threads`` intra-op
threads). SimpleCIL and RanPAC time their statistics pass over a batch instead (RanPAC's
phase 2 on the frozen backbone: ``h = ReLU(f W)``, ``G += h^T h``, ``Q += h^T y``); APER
times its first session's step (AdaptFormer adapters in every block and the cosine
classifier, the ``adapter`` variant; RanPAC's first session is the same step).
CODA-Prompt's JAX step weighs all M components (those of later tasks masked to 0, so one
program serves every task); the PyTorch port, like the official code, only those of tasks
0..t -- on task 0 that is 1/T of them. SD-LoRA's and O-LoRA's JAX steps likewise carry
every task's LoRA branch (stacked along the rank, later ones zero; InfLoRA's, and
SD-LoRA's on a narrow ViT, fold the branches that do not learn into the kernels, under
float32 matmuls), whatever the task; the ports, task ``--task``'s as the official
forwards form them (InfLoRA: ``B_0 A_0``, a D x D weight at key and value, task 0's only;
SD-LoRA and O-LoRA: ``B(A x)`` at query and value, beside the earlier tasks' branches,
which the official forwards run from task 1 on). EASE's JAX
step gathers the current task's adapters from every task's, stacked; its port, like the
official code, holds the current ones only (the same computation).

``--mode demo`` times the demo end to end (``python -m pecft_jax.run`` on the method's
default config -- Split MNIST, S-Prompts' Domain MNIST, Progressive Prompts' WordNet on
all-MiniLM-L6-v2's encoder; any method with a demo config, alone
with ``--variants jax`` where this script has no PyTorch port of its step or the demo is
mostly statistics passes (SimpleCIL, RanPAC, APER) -- with
an empty compilation cache, so compilation is counted) against the PyTorch-eager step loop
it replaces: the demo's number of training steps times the PyTorch step at the demo's
shapes (evaluation and data loading not included on the PyTorch side, so the comparison
favours PyTorch; the step is timed with this script's 100 classes / 10 tasks, not the
demo's 10 / 5, which changes only the head's width). Where the official step grows with
the task (``GROWS_WITH_TASK``: Progressive Prompts' sequence holds the prompts learnt so
far; SD-LoRA and O-LoRA run every earlier task's LoRA beside the new one), the port is
timed at each task's layout and the loop is the sum over the demo's tasks of their steps
(the run's own plan) times that task's step; ``--task`` times one such later task's step
in ``--mode step``. ``--warm-cache`` runs the demo a
second time in each round on the compilation cache the first run filled, as a re-run does.

Text methods (Progressive Prompts) run on a BERT encoder (``--arch``: one of
``pecft_jax.backbones.bert``'s named configs, default the demo's MiniLM-L6-H384, batch 32)
over random token ids of 48 tokens with padding, WordNet's length.

PyTorch is not a dependency of pecft_jax: ``pip install torch`` to run the torch variant.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the methods whose step experiments/torch_ports.py ports to PyTorch (--mode step times only
# these)
METHODS = ("l2p", "dualprompt", "coda_prompt", "hide_prompt", "s_prompts", "simplecil",
           "ranpac", "finetune", "aper", "slca", "inflora", "ease", "ssiat", "lae", "sd_lora",
           "o_lora", "progressive_prompts")
# every method with a demo config: --mode demo times any demo (alone, --variants jax, when
# the script has no PyTorch port of its step)
DEMO_METHODS = tuple(sorted(name[:-3] for name in os.listdir(
    os.path.join(ROOT, "experiments", "configs")) if name.endswith(".py")))
# the demos' backbone and batch: the image demos' ViT, the text demo's MiniLM encoder
# (WordNet, texts of 48 tokens, experiments/configs/progressive_prompts.py)
DEMO_SHAPES = {"image": ("ViT-Demo/7", 64), "text": ("MiniLM-L6-H384", 32)}
TEXT_METHODS = ("progressive_prompts",)
TEXT_LENGTH = 48
TEXT_VOCABULARY = 30522  # BERT's uncased WordPiece vocabulary, whose ids inputs() draws
# methods whose training step reads the frozen query, which the loop then precomputes for
# un-augmented data; for the others 'jax-cached' would time a step the loop never runs
QUERY_IN_STEP = ("l2p", "dualprompt", "coda_prompt")
# methods without a gradient step: their per-task work, and what is timed, is a statistics pass
STATISTICS_PASS = ("simplecil", "ranpac")
# methods whose demo is mostly statistics passes: a PyTorch loop of their gradient steps
# (none, or the first task's only: 36 of APER's demo) leaves most of it out
MOSTLY_PASSES = STATISTICS_PASS + ("aper",)
# methods whose official step grows with the task and whose port lays out task --task's step
# (Progressive Prompts: the text, then the prompts 0..t; SD-LoRA, O-LoRA: the earlier tasks'
# LoRA branches beside the new one): --task > 0 times a later task, and --mode demo times
# the PyTorch loop task by task. (InfLoRA's official forward also forms the sum of tasks
# 0..t's B_s A_s, CODA-Prompt's weighs tasks 0..t's components: (D x D) and (B x M x D)
# work per layer, not per token; their ports time task 0's step, which favours PyTorch.)
GROWS_WITH_TASK = ("progressive_prompts", "sd_lora", "o_lora")
NUM_CLASSES, NUM_TASKS = 100, 10
LEARNING_RATE = 1e-3


# ============================================================================= shared
def demo_method_config(method: str) -> dict:
    """The method's settings in its demo config (``experiments/configs/<m>.py``'s default
    benchmark: ``split_mnist``, ``domain_mnist`` for S-Prompts, ``wordnet`` for Progressive
    Prompts)."""
    from pecft_jax.configs import load_config_file
    path = os.path.join(ROOT, "experiments", "configs", f"{method}.py")
    return load_config_file(path).method.to_dict()


def make_method(args):
    """The pecft_jax method (its Config resolved) and the architecture."""
    from pecft_jax.backbones import vit
    from pecft_jax.backbones.backbone import Backbone
    from pecft_jax.methods import create_method
    values = demo_method_config(args.method) if args.demo_settings else {"name": args.method}
    for item in args.set:
        key, value = item.split("=", 1)
        values[key] = json.loads(value)
    if args.method == "ranpac":  # its phase-2 statistics pass, on the frozen backbone's
        values["first_session"] = "none"  # features (the PyTorch port has no adapter)
    if modality(args.method) == "text":  # the tokenizer (the method reads [CLS]'s id): MiniLM's
        from pecft_jax.backbones import bert
        from pecft_jax.backbones.backbone import TextBackbone, minilm_dir
        cfg = bert.get_config(args.arch, dtype=args.dtype, attention=args.attention)
        backbone = TextBackbone(cfg, minilm_dir(), TEXT_LENGTH)
    else:
        cfg = vit.get_config(args.arch, dtype=args.dtype, attention=args.attention)
        backbone = Backbone(cfg)
    return create_method(args.method, values, backbone, NUM_CLASSES, NUM_TASKS), cfg


def modality(method: str) -> str:
    return "text" if method in TEXT_METHODS else "image"


def modality_of(cfg) -> str:
    """A backbone config's input kind."""
    from pecft_jax.backbones import bert
    return "text" if isinstance(cfg, bert.BertConfig) else "image"


def init_frozen(cfg, key):
    """Random frozen weights of the backbone (a ViT or a BERT encoder)."""
    from pecft_jax.backbones import bert, vit
    return (bert if modality_of(cfg) == "text" else vit).init_params(cfg, key)


def task_classes():
    per = NUM_CLASSES // NUM_TASKS
    return tuple(tuple(range(t * per, (t + 1) * per)) for t in range(NUM_TASKS))


def inputs(cfg, batch: int, task: int = 0):
    """Fixed random inputs and labels of ``task``'s classes, as numpy: images (NHWC) for a ViT;
    for a text encoder, token ids of ``TEXT_LENGTH`` ([CLS], then words, then padding: the
    texts' real lengths drawn from 8 to all of it) and their attention mask."""
    import numpy as np
    rng = np.random.default_rng(0)
    per = NUM_CLASSES // NUM_TASKS
    labels = (task * per + np.arange(batch) % per).astype(np.int32)
    if modality_of(cfg) == "text":
        lengths = rng.integers(8, TEXT_LENGTH + 1, batch)
        mask = (np.arange(TEXT_LENGTH)[None, :] < lengths[:, None]).astype(np.int32)
        ids = rng.integers(1000, TEXT_VOCABULARY, (batch, TEXT_LENGTH)).astype(np.int32)
        ids[:, 0] = 101  # [CLS] in BERT's uncased vocabulary (make_method's tokenizer's)
        return {"token_ids": ids * mask, "attention_mask": mask}, labels
    images = rng.standard_normal((batch, cfg.image_size, cfg.image_size, cfg.num_channels),
                                 dtype=np.float32)
    return images, labels


# dense bf16 peak FLOP/s by device kind (vendor datasheets, SXM parts), for the MFU
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10G": 70e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v4": 275e12}


def accelerator_report(flops: float, seconds: float, device_kind: str,
                       peak_bytes: float = None) -> Dict[str, float]:
    """FLOPs per step (XLA's cost analysis), achieved FLOP/s, the MFU against the card's
    bf16 peak when known, and the peak device memory when the backend reports it."""
    out = {"flops": flops, "flops_per_s": flops / seconds if flops else None,
           "device_kind": device_kind}
    peak = next((v for k, v in BF16_PEAK.items() if k.lower() in device_kind.lower()), None)
    if peak and flops:
        out["mfu"] = flops / seconds / peak
    if peak_bytes:
        out["peak_memory_bytes"] = peak_bytes
    return out


def step_flops(jitted, *args) -> float:
    """XLA's FLOP count of one call of ``jitted`` (0 when the backend does not say), for one
    device: of a program split over several, XLA analyses one device's part (measured: the
    L2P demo step counts 6.66 GFLOP on one device, 3.33 on each of two)."""
    try:
        cost = jitted.lower(*args).compile().cost_analysis()
    except Exception:  # cost analysis is best-effort in every backend
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def jax_peak_memory():
    import jax
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def timed(step, steps: int, warmup: int = 3) -> Dict[str, float]:
    """Median wall and CPU seconds of ``step()`` (which must block until its result)."""
    for _ in range(warmup):
        step()
    walls, cpus = [], []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus)}


# ============================================================================ pecft_jax
def perturbed(tree, key, scale: float = 0.01):
    """``tree`` plus small normal noise on every float leaf (the values do not change the
    cost; a later task's step then sees non-zero earlier parameters, as after training)."""
    import jax
    import jax.numpy as jnp
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype)
        if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
        for leaf, k in zip(leaves, keys)])


def jax_worker(args, cached: bool) -> Dict[str, float]:
    import jax
    import numpy as np
    import optax
    from pecft_jax import compiler
    from pecft_jax.backbones.backbone import attention_for_devices
    from pecft_jax.methods import TaskData, TaskSpec
    from pecft_jax.methods.common import FROZEN_QUERY, frozen_query
    from pecft_jax.train import mesh as mesh_lib
    from pecft_jax.train import partition

    # as the loop does: the host split into devices (before JAX starts), the batch sharded
    # over them, everything else replicated. One device otherwise (an accelerator's step
    # against PyTorch's one device), whatever else XLA_FLAGS or the machine offer. The split
    # first: building a method may start JAX (HiDe-Prompt's eval_shape), and then it is late.
    mesh_lib.split_host(args.host_devices)
    method, cfg = make_method(args)
    on_cpu = jax.default_backend() == "cpu"
    mesh = mesh_lib.make_mesh(max(args.host_devices, 1) if on_cpu else 1)
    mesh_lib.check_batch_size(args.batch_size, mesh, "--batch-size")
    if attention_for_devices(args.attention, mesh.devices.flat, fall_back=True) != \
            args.attention:
        raise SystemExit(f"--attention {args.attention} is cuDNN's fused attention, for "
                         f"NVIDIA GPUs; these devices are not: use --attention xla")
    frozen = jax.jit(lambda key: init_frozen(cfg, key))(jax.random.key(0))
    trainable, state = jax.jit(method.init)(jax.random.key(1), frozen)
    if args.task:  # as if tasks 0..t-1 had trained: no earlier factor at its zero start
        # (SD-LoRA divides by the norms of the earlier directions)
        trainable = jax.jit(perturbed)(trainable, jax.random.key(4))
    spec = TaskSpec(args.task, NUM_CLASSES, task_classes())
    batch_inputs, labels = inputs(cfg, args.batch_size, args.task)
    local = {"inputs": batch_inputs, "label": labels, "mask": np.ones(args.batch_size, np.float32),
             "index": np.arange(args.batch_size, dtype=np.int32)}
    # the timed batch as the task's data (InfLoRA designs its down-projections from it)
    data = TaskData(lambda: iter([local]), args.batch_size,
                    shard=lambda b: mesh_lib.shard_batch(b, mesh), gather=mesh_lib.to_host,
                    replicated=mesh_lib.replicated(mesh))
    trainable, state = method.before_task(spec, trainable, state, frozen, data,
                                          jax.random.key(2))
    frozen, trainable, state = mesh_lib.replicate((frozen, trainable, state), mesh)
    batch = mesh_lib.shard_batch(local, mesh)
    if cached:
        query = compiler.jit(lambda f, x: frozen_query(method.backbone, f, {"inputs": x}))
        batch[FROZEN_QUERY] = query(frozen, batch["inputs"])
    task = spec if method.static_task else TaskSpec(np.int32(args.task), NUM_CLASSES,
                                                     task_classes())

    kind = jax.local_devices()[0].device_kind
    if method.name in STATISTICS_PASS:
        carry, fn, extra = statistics_pass(method, trainable, state)
        step_fn = compiler.jit(fn, donate_argnums=0)
        flops = step_flops(step_fn, carry, batch, frozen, extra) * mesh.size
        box = [carry]

        def step():
            box[0] = step_fn(box[0], batch, frozen, extra)
            jax.block_until_ready(box[0])
        result = timed(step, args.steps)
        return dict(result, devices=mesh.size,
                    **accelerator_report(flops, result["wall"], kind, jax_peak_memory()))

    state = method.step_state(state)  # what the loop passes into its steps
    labels_tree = method.param_labels(trainable, spec)
    optimizer = partition.make_optimizer(
        labels_tree, method.optimizer_groups(spec, optax.adam(LEARNING_RATE)))
    opt_state = optimizer.init(trainable)
    static = (7,) if method.static_task else ()
    update = compiler.jit(lambda tr, st, os_, fr, b, key, step, t: method.update(
        tr, st, os_, fr, b, jax.random.fold_in(key, step), t, optimizer),
        donate_argnums=(0, 1, 2), static_argnums=static)
    key = jax.random.key(3)
    flops = mesh.size * step_flops(update, trainable, state, opt_state, frozen, batch, key,
                                   np.int32(0), task)
    box = [trainable, state, opt_state, 0, None]

    def step():
        tr, st, os_, n, _ = box
        tr, st, os_, metrics = update(tr, st, os_, frozen, batch, key, np.int32(n), task)
        jax.block_until_ready(metrics)
        box[:] = [tr, st, os_, n + 1, metrics]
    result = timed(step, args.steps)
    loss = float(box[-1]["loss"])
    if not np.isfinite(loss):  # a step that computes nothing sensible times nothing useful
        raise SystemExit(f"the timed {args.method} step's loss is {loss}")
    return dict(result, devices=mesh.size, loss=loss,
                **accelerator_report(flops, result["wall"], kind, jax_peak_memory()))


def statistics_pass(method, trainable, state):
    """The per-batch part of a gradient-free method's ``after_task``, as it runs there:
    ``(initial carry, fn(carry, batch, frozen, extra), extra)``, the arrays it reads passed
    as arguments (as TaskData does), not baked in as constants."""
    import jax
    import jax.numpy as jnp
    from pecft_jax.methods.common import frozen_query
    from pecft_jax.methods.ranpac import add_gram
    from pecft_jax.methods.simplecil import class_feature_sums
    if method.name == "simplecil":
        def fn(carry, batch, frozen, extra):
            return class_feature_sums(carry, frozen_query(method.backbone, frozen, batch),
                                      batch["label"], batch["mask"])
        return state, fn, ()
    if method.name == "ranpac":
        m = method.width

        def fn(carry, batch, frozen, extra):
            trainable, projection = extra
            h = method.project(projection, method.features(trainable, frozen, batch))
            y = jax.nn.one_hot(batch["label"], NUM_CLASSES, dtype=h.dtype)
            return add_gram(carry, h, y, batch["mask"])
        projection = {"w_rand": state["w_rand"]} if method.config.M else {}
        return ({"G": jnp.zeros((m, m)), "Q": jnp.zeros((m, NUM_CLASSES))}, fn,
                (trainable, projection))
    raise ValueError(f"no statistics pass for {method.name}")


# ============================================================================== PyTorch
def torch_worker(args) -> Dict[str, float]:
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch_ports

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_device(device)
    # bf16 as the JAX side's compute dtype: autocast matmuls, float32 parameters
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    method, cfg = make_method(args)
    batch_inputs, labels = inputs(cfg, args.batch_size, args.task)
    mask = torch.full((NUM_CLASSES,), float("-inf"))
    mask[list(task_classes()[args.task])] = 0  # train on the task's classes
    if modality(method.name) == "text":
        model = torch_ports.Bert(cfg)
        batch_inputs = {k: torch.from_numpy(v).long().to(device) for k, v in batch_inputs.items()}
    else:
        model = torch_ports.ViT(cfg)
        batch_inputs = torch.from_numpy(batch_inputs).permute(0, 3, 1, 2).contiguous().to(device)
    step_inputs = torch_ports.Step(
        method=method, cfg=cfg, model=model.requires_grad_(False), inputs=batch_inputs,
        labels=torch.from_numpy(labels).long().to(device), mask=mask, num_classes=NUM_CLASSES,
        task=args.task)
    if method.name in STATISTICS_PASS:
        step = torch_ports.statistics_step(step_inputs, autocast)
        return dict(timed(step, args.steps), **torch_memory(torch))
    if method.name not in torch_ports.PORTS:
        raise SystemExit(f"no PyTorch port of {method.name} in experiments/torch_ports.py")
    ported = torch_ports.PORTS[method.name](step_inputs)
    opt = torch.optim.Adam(ported.params, lr=LEARNING_RATE)

    last = []

    def step():
        with autocast:
            loss = ported.loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if ported.before_update is not None:
            ported.before_update()
        opt.step()
        last[:] = [loss.item()]
    result = timed(step, args.steps)
    if not math.isfinite(last[0]):  # as the JAX worker: a broken step times nothing useful
        raise SystemExit(f"the timed PyTorch {args.method} step's loss is {last[0]}")
    return dict(result, loss=last[0], **torch_memory(torch))


def torch_memory(torch) -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"peak_memory_bytes": torch.cuda.max_memory_allocated(),
            "device_kind": torch.cuda.get_device_name()}


# ========================================================================= orchestrator
def machine() -> str:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{platform.node()}: {model}, {os.cpu_count()} CPUs, {platform.system()}"


def versions() -> str:
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.__version__)"],
                         capture_output=True, text=True)
    torch = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                           capture_output=True, text=True)
    from pecft_jax import compiler  # what the library's programs compile with
    return (f"jax {out.stdout.strip() or '?'}, torch "
            f"{torch.stdout.strip() if torch.returncode == 0 else 'not installed'}; "
            f"pecft_jax XLA options {compiler.compiler_options()}")


def run_worker(args, variant: str, task: Optional[int] = None) -> dict:
    """One worker process (``task``: the timed task, default ``--task``)."""
    task = args.task if task is None else task
    command = [sys.executable, os.path.abspath(__file__), "--worker", variant,
               "--task", str(task), "--method", args.method, "--arch", args.arch, "--batch-size",
               str(args.batch_size), "--steps", str(args.steps), "--threads", str(args.threads),
               "--dtype", args.dtype, "--attention", args.attention,
               "--host-devices", str(args.host_devices or 0)]
    command += ["--demo-settings"] if args.demo_settings else []
    for item in args.set:
        command += ["--set", item]
    load_before = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{variant} worker failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load"] = (load_before, os.getloadavg()[0])
    return result


def require_torch(flags_without_it: str) -> None:
    """Stops, before anything is timed, where the PyTorch side cannot run."""
    if subprocess.run([sys.executable, "-c", "import torch"],
                      capture_output=True).returncode != 0:
        raise SystemExit(f"PyTorch is not installed: pip install torch (not a pecft_jax "
                         f"dependency), or pass {flags_without_it}")


def step_mode(args) -> None:
    variants = [v for v in args.variants.split(",") if v]
    if args.method not in QUERY_IN_STEP and "jax-cached" in variants:
        variants.remove("jax-cached")
    if "torch" in variants:
        require_torch("--variants jax,jax-cached")
    results: Dict[str, List[dict]] = {v: [] for v in variants}
    for round_index in range(args.rounds):
        for variant in variants:
            result = run_worker(args, variant)
            results[variant].append(result)
            print(f"  round {round_index + 1} {variant:10s} {1e3 * result['wall']:8.1f} ms wall "
                  f"{1e3 * result['cpu']:8.1f} ms CPU  load {result['load'][0]:.2f}->"
                  f"{result['load'][1]:.2f}", flush=True)
    print(f"command: python experiments/benchmark_step.py {' '.join(sys.argv[1:])}")
    print(f"machine: {machine()}; {versions()}; {args.threads} threads")
    jax_devices = sorted({row["devices"] for variant, rows in results.items()
                          if variant != "torch" for row in rows})  # what the workers ran on
    print(f"{args.method} step{f' at task {args.task}' if args.task else ''}, {args.arch}, "
          f"batch {args.batch_size}, {args.dtype}, attention "
          f"{args.attention}, {args.steps} timed steps x {args.rounds} rounds (alternating "
          f"processes); JAX on {'/'.join(map(str, jax_devices)) or '-'} device(s)")
    medians = {}
    for variant, rows in results.items():
        wall = statistics.median(r["wall"] for r in rows)
        cpu = statistics.median(r["cpu"] for r in rows)
        spread = (min(r["wall"] for r in rows), max(r["wall"] for r in rows))
        loads = [r["load"][0] for r in rows]
        medians[variant] = wall
        unit = "texts/s " if modality(args.method) == "text" else "images/s"
        print(f"  {variant:10s} {args.batch_size / wall:9.1f} {unit}  {1e3 * wall:8.1f} ms/step "
              f"(rounds {1e3 * spread[0]:.1f}-{1e3 * spread[1]:.1f})  CPU {1e3 * cpu:8.1f} "
              f"ms/step  load {min(loads):.2f}-{max(loads):.2f}")
        last = rows[-1]
        extras = []
        if last.get("flops"):
            extras.append(f"{last['flops'] / 1e9:.1f} GFLOP/step (XLA), "
                          f"{last['flops'] / wall / 1e12:.2f} TFLOP/s")
        if last.get("mfu") is not None:
            extras.append(f"MFU {100 * last['mfu']:.1f}% of {last['device_kind']} bf16 peak")
        if last.get("peak_memory_bytes"):
            extras.append(f"peak memory {last['peak_memory_bytes'] / 2 ** 30:.2f} GiB")
        if extras:
            print(f"  {'':10s} " + "; ".join(extras))
    if "torch" in medians:
        for variant in medians:
            if variant != "torch":
                print(f"  speed-up {variant} vs PyTorch eager: "
                      f"{medians['torch'] / medians[variant]:.2f}x")


def demo_run(args, workdir: str, cache_dir: str) -> dict:
    """One demo process: its wall time and what its results.json says of compilation."""
    command = [sys.executable, "-m", "pecft_jax.run", "--config",
               f"experiments/configs/{args.method}.py", "--workdir", workdir,
               "--config.progress_bar=False", f"--config.compilation_cache_dir={cache_dir}",
               ] + ([] if args.host_devices is None else
                    [f"--config.host_devices={args.host_devices}"])
    load_before, start = os.getloadavg()[0], time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"demo run failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    comp = results["compilation"]
    return {"wall": wall, "compile": comp["compile_seconds"] + comp["trace_seconds"],
            "xla": comp["xla_compilations"], "cache_hits": comp["cache_hits"],
            "steps": results["train_steps"], "final": results["metrics"]["average_accuracy"],
            "devices": results["layout"]["devices"],
            "load": load_before}


def demo_task_steps(method: str) -> List[int]:
    """Each task's training steps in ``method``'s demo, from the run's own plan (what
    ``--dry_run`` prints)."""
    from pecft_jax.configs import load_config_file
    from pecft_jax.train.loop import plan_run
    config = load_config_file(os.path.join(ROOT, "experiments", "configs", f"{method}.py"))
    return [task["steps"] for task in plan_run(config)["tasks"]]


def torch_loop_plan(args) -> Dict[int, Optional[int]]:
    """``{task: steps}`` of the PyTorch loop: for a method whose official step grows with
    the task (``GROWS_WITH_TASK``), every task of the demo with its own steps, timed at its
    own layout; otherwise ``{0: None}``, task 0's step for all of the demo's steps (filled
    in from the first run's count by :func:`demo_mode`)."""
    if args.method not in GROWS_WITH_TASK:
        return {0: None}
    command = [sys.executable, os.path.abspath(__file__), "--worker", "plan", "--method",
               args.method]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"planning the demo's tasks failed:\n{done.stderr[-3000:]}")
    steps = json.loads(done.stdout.strip().splitlines()[-1])
    if len(steps) > NUM_TASKS:
        raise SystemExit(f"the {args.method} demo has {len(steps)} tasks; the PyTorch step "
                         f"is laid out for at most {NUM_TASKS}")
    if not any(steps):
        raise SystemExit(f"the {args.method} demo's plan has no training steps: there is no "
                         f"PyTorch loop to compare it with")
    return {t: n for t, n in enumerate(steps) if n}


def demo_mode(args) -> None:
    kinds = ("cold", "warm") if args.warm_cache else ("cold",)
    rows: Dict[str, List[dict]] = {kind: [] for kind in kinds}
    with_torch = "torch" in args.variants.split(",")
    if with_torch:  # before minutes of demo runs, not after them
        require_torch("--variants jax")
    loop_tasks = torch_loop_plan(args) if with_torch else {}
    torch_steps: Dict[int, List[float]] = {t: [] for t in loop_tasks}
    for round_index in range(args.rounds):
        with tempfile.TemporaryDirectory() as workdir:
            cache_dir = os.path.join(workdir, "xla")  # empty for the cold run
            for kind in kinds:  # the warm run reads what the cold one compiled
                row = demo_run(args, os.path.join(workdir, kind), cache_dir)
                if loop_tasks == {0: None}:  # task 0's step for all of the run's steps
                    loop_tasks = {0: row["steps"]}
                planned = sum(loop_tasks.values())
                if loop_tasks and planned != row["steps"]:  # before minutes more are timed
                    raise SystemExit(f"the demo's plan counts {planned} steps, its run "
                                     f"{row['steps']}: the PyTorch loop would not be the "
                                     f"demo's")
                rows[kind].append(row)
                print(f"  round {round_index + 1}: demo, {kind} compilation cache, "
                      f"{row['wall']:.1f} s (compile + trace {row['compile']:.1f} s, "
                      f"{row['xla']} XLA compilations, {row['cache_hits']} cache reads, "
                      f"{row['steps']} steps, {row['devices']} device(s), final "
                      f"{row['final']:.2f}%), load "
                      f"{row['load']:.2f}", flush=True)
        for t in loop_tasks:
            torch_steps[t].append(run_worker(args, "torch", task=t)["wall"])
            print(f"  round {round_index + 1}: torch step"
                  f"{f' at task {t}' if len(loop_tasks) > 1 else ''} "
                  f"{1e3 * torch_steps[t][-1]:.1f} ms", flush=True)
    print(f"command: python experiments/benchmark_step.py {' '.join(sys.argv[1:])}")
    print(f"machine: {machine()}; {versions()}; {args.threads} threads (torch)")
    demo_steps = rows["cold"][0]["steps"]
    torch_loop = sum(n * statistics.median(torch_steps[t]) for t, n in loop_tasks.items())
    for t, n in loop_tasks.items():
        times = torch_steps[t]
        print(f"  PyTorch-eager step{f' at task {t}' if len(loop_tasks) > 1 else ''}: "
              f"{1e3 * statistics.median(times):.1f} ms (rounds {1e3 * min(times):.1f}-"
              f"{1e3 * max(times):.1f}) x {n} steps")
    if torch_loop:
        print(f"  PyTorch-eager step loop alone ({demo_steps} steps): {torch_loop:.1f} s")
    for kind in kinds:
        walls = [r["wall"] for r in rows[kind]]
        wall = statistics.median(walls)
        comp = statistics.median(r["compile"] for r in rows[kind])
        print(f"{args.method} demo, {kind} cache: median {wall:.1f} s end to end (rounds "
              f"{min(walls):.1f}-{max(walls):.1f}), "
              f"compile + trace {comp:.1f} s ({100 * comp / wall:.0f}%), "
              f"{rows[kind][0]['xla']} XLA compilations"
              + (f"; demo / torch loop = {wall / torch_loop:.2f}" if torch_loop else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("step", "demo"), default="step")
    parser.add_argument("--method", choices=DEMO_METHODS, default="l2p",
                        help=f"--mode step: one of {', '.join(METHODS)} (those with a "
                             f"PyTorch port here); --mode demo: any")
    parser.add_argument("--arch", default=None,
                        help=f"the backbone's named config (default: the demo's, "
                             f"{DEMO_SHAPES['image'][0]}; {DEMO_SHAPES['text'][0]} for "
                             f"{', '.join(TEXT_METHODS)})")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"default: the demo's ({DEMO_SHAPES['image'][1]}; "
                             f"{DEMO_SHAPES['text'][1]} for the text methods)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--variants", default="jax,jax-cached,torch")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of both sides (parameters stay float32)")
    parser.add_argument("--attention", choices=("einsum", "xla", "cudnn"),
                        default="einsum", help="the JAX side's attention implementation")
    parser.add_argument("--demo-settings", action="store_true",
                        help="the method's settings from its demo config (default: its "
                             "Config defaults, the paper's)")
    parser.add_argument("--set", action="append", default=[],
                        help="a method Config field, KEY=JSON (repeatable)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="--mode demo: after each cold run, run the demo again on the "
                             "compilation cache it filled (a re-run)")
    parser.add_argument("--host-devices", type=int, default=None,
                        help="the JAX side's host_devices (a CPU host split into this many "
                             "devices, the batch sharded over them as the loop does; 0: "
                             "XLA's one CPU device). --mode step: default 0, and always one "
                             "device on an accelerator; --mode demo: default the config's "
                             "(2 in the image demos)")
    parser.add_argument("--task", type=int, default=0,
                        help=f"--mode step: the timed task (default 0), for a method whose "
                             f"official step grows with the task "
                             f"({', '.join(GROWS_WITH_TASK)})")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    demo_shape = DEMO_SHAPES[modality(args.method)]
    args.arch = args.arch or demo_shape[0]
    args.batch_size = demo_shape[1] if args.batch_size is None else args.batch_size
    for flag in ("rounds", "steps", "batch_size", "threads"):
        if getattr(args, flag) < 1:  # a median of nothing would end in a traceback
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got "
                         f"{getattr(args, flag)}")
    if not 0 <= args.task < NUM_TASKS:
        parser.error(f"--task must be in 0..{NUM_TASKS - 1} (the step's {NUM_TASKS} tasks), "
                     f"got {args.task}")
    if args.task and args.method not in GROWS_WITH_TASK:
        parser.error(f"--task {args.task}: {args.method}'s PyTorch port times task 0's step "
                     f"(--task applies to {', '.join(GROWS_WITH_TASK)}, whose official step "
                     f"grows with the task)")
    if args.task and args.mode == "demo" and not args.worker:
        parser.error("--mode demo times every task of the demo; leave --task out")
    if args.host_devices is not None and args.host_devices < 0:
        parser.error(f"--host-devices must be 0 (XLA's one CPU device) or more, got "
                     f"{args.host_devices}")
    if args.mode == "demo" and (args.arch, args.batch_size) != demo_shape:
        parser.error(f"--mode demo runs the demo's own backbone and batch ({demo_shape[0]}, "
                     f"{demo_shape[1]}); leave --arch and --batch-size out, or time a step "
                     f"of those with --mode step")
    from pecft_jax.backbones import bert, vit
    if modality(args.method) == "text":  # those with the vocabulary inputs() draws from
        known = tuple(name for name in bert.named_configs()
                      if bert.get_config(name).vocab_size >= TEXT_VOCABULARY)
        kind = "BERT encoder"
    else:
        known, kind = vit.named_configs(), "ViT"
    if args.arch not in known:
        parser.error(f"--arch {args.arch}: {args.method} runs on a {kind}, one of "
                     f"{', '.join(known)}")
    torch_wanted = "torch" in args.variants.split(",")
    if args.method not in METHODS and (args.mode == "step" or torch_wanted):
        parser.error(f"--method {args.method}: this script has no PyTorch port of its step "
                     f"(ports: {', '.join(METHODS)}); time its demo alone with --mode demo "
                     f"--variants jax")
    if args.mode == "demo":
        if args.method in MOSTLY_PASSES and torch_wanted:
            parser.error(f"--mode demo compares a demo with a PyTorch loop of its gradient "
                         f"steps; {args.method}'s demo is (mostly) statistics passes: time "
                         f"those with --mode step, or its demo alone with --variants jax")
    try:  # the backbones' own rule (cuDNN's attention takes bf16), before any worker starts
        vit.check_execution(args.dtype, args.attention)
    except ValueError as error:
        parser.error(f"--dtype {args.dtype} --attention {args.attention}: {error}")
    if args.mode == "step" and args.host_devices is None:
        args.host_devices = 0
    if args.mode == "step" and args.method in STATISTICS_PASS and args.host_devices > 1:
        parser.error(f"--host-devices {args.host_devices}: {args.method}'s statistics "
                     f"pass keeps a carry per device in the loop (TaskData.reduce), which "
                     f"this script does not reproduce; time its demo instead (--mode demo) "
                     f"or leave --host-devices at 0")
    if args.worker:
        if args.worker == "plan":
            result = demo_task_steps(args.method)
        elif args.worker == "torch":
            result = torch_worker(args)
        else:
            result = jax_worker(args, cached=args.worker == "jax-cached")
        print(json.dumps(result))
    elif args.mode == "demo":
        args.demo_settings = True  # the PyTorch step at the demo's settings
        demo_mode(args)
    else:
        step_mode(args)


if __name__ == "__main__":
    main()
