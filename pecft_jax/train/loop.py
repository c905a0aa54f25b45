"""The one continual driver every method runs on.

    for each task t:
        trainable, state = method.before_task(t, data of task t)
        method.train_epochs(t) epochs of jit-compiled, data-parallel method.update steps
                                        (none at all, and no optimizer, when it is 0)
        trainable, state = method.after_task(t, data of task t)
        evaluate on tasks 0..t           -> a row of the class-IL and task-IL accuracy matrices
        checkpoint                       (plus every N steps inside the task)

Every random number derives from ``config.seed`` by folding in the task and the step, and
the data order from (seed, task, epoch); so a run resumed from a checkpoint computes exactly
what the uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import signal
import tempfile
import threading
import time
import zlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pecft_jax import compiler
from pecft_jax import metrics as metrics_lib
from pecft_jax.backbones import vit
from pecft_jax.backbones.backbone import attention_for_devices, backbone_from_config
from pecft_jax.backbones.pretrained import fingerprint
from pecft_jax.data import loader, pipeline, scenarios
from pecft_jax.data.text import TextPreprocess
from pecft_jax.configs import (HASHED_ONLY_WHEN_SET, OPTIMIZERS, SCHEDULES, check_run_config,
                               check_wandb_installed, distributed_settings, flatten_config,
                               is_execution_key)
from pecft_jax.files import write_json_atomic, write_text_atomic
from pecft_jax.methods import Method, TaskData, TaskSpec, create_method
from pecft_jax.methods.base import count_params, merge_state
from pecft_jax.methods.common import (FIXED_FEATURES, FROZEN_QUERY, TASK_FEATURES,
                                      frozen_query)
from pecft_jax.methods.statistics import (coda_cosine_schedule, cosine_epoch_schedule,
                                         multistep_epoch_schedule, timm_cosine_schedule,
                                         warmup_cosine_schedule)
from pecft_jax.train import compilation
from pecft_jax.train import mesh as mesh_lib
from pecft_jax.train import optimizers, partition
from pecft_jax.train.checkpoint import Checkpointer, CheckpointMismatch
from pecft_jax.train.feature_cache import FeatureCache, PassRows, concatenate, with_cached
from pecft_jax.train.logging_utils import MetricWriter, progress

log = logging.getLogger("pecft_jax")
Array = jax.Array


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) the experiment in ``workdir`` and writes ``results.json``."""
    os.makedirs(workdir, exist_ok=True)
    monitor = compilation.CompileMonitor()
    trainer = ContinualTrainer(config, workdir)
    try:
        results = trainer.run()
        results["compilation"] = dict(monitor.report(), traces=dict(trainer.trace_counts))
    except BaseException:
        trainer.close(failed=True)
        raise
    trainer.close()
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, "results.json"), results, indent=1,
                          default=_json_default)
        try:
            from pecft_jax import plots
            plots.plot_accuracy_matrices(results, os.path.join(workdir, "accuracy_matrix.png"))
        except Exception as err:  # a figure is not a result: results.json stands, say why
            log.warning("accuracy_matrix.png not drawn (%s: %s)", type(err).__name__, err)
    return results


@dataclasses.dataclass
class RunState:
    """Everything that evolves over a run (and is checkpointed)."""
    trainable: dict
    state: dict
    accuracy_matrix: List[List[float]]
    task_il_matrix: List[List[float]]
    extra_rows: Dict[str, List[List[float]]]
    seconds_per_task: List[float]
    global_step: int = 0
    task_started: float = 0.0  # wall clock of the current task's start (resumes included)
    skipped_steps: int = 0  # steps skipped for a non-finite loss (train.on_nonfinite)
    # the latest evaluation's class-IL confusion over the seen classes (every class under
    # eval.class_il_classes='all'):
    # {'classes': remapped ids, 'matrix': counts (true x predicted)}
    confusion: Optional[dict] = None
    # accuracies of the model before any task is learnt (eval.fwt_reference='init'):
    # {'class_il': [...], 'task_il': [...]}, one per task
    reference: Optional[dict] = None


@dataclasses.dataclass
class Position:
    """Where a run continues: a task, and -- when it resumes inside that task, past its
    ``before_task`` -- the step and the optimizer state (which may hold no arrays at all,
    e.g. plain SGD, so "inside" is said explicitly)."""
    task: int = 0
    step: int = 0
    opt_state: Any = None
    inside: bool = False
    seconds_in_task: float = 0.0  # spent on the task before the checkpoint resumed from
    input_state: Optional[dict] = None  # the training batches' grain iterator, when saved


def plan_run(config: ml_collections.ConfigDict) -> dict:
    """What a run of ``config`` would do, without training or writing anything: the
    resolved config (method defaults filled in), the class order, every task's classes,
    examples, epochs and steps, and the parameter counts (the trainable tree and state at
    initialisation, from shapes: nothing is computed). ``python -m pecft_jax.run
    --dry_run`` prints it."""
    with tempfile.TemporaryDirectory() as scratch:  # the trainer's checkpointer wants a dir
        trainer = ContinualTrainer(config, scratch, write_metrics=False,
                                   attention_fallback=True)
        try:
            trainable, state = jax.eval_shape(trainer.method.init, jax.random.key(0),
                                              trainer.frozen)
            order = [int(c) for c in trainer.scenario.class_order]
            tasks = []
            for t, task in enumerate(trainer.tasks):
                epochs = trainer.epochs(trainer.task_spec(t))
                tasks.append({"classes": [order[c] for c in task.classes],
                              "train_examples": len(task.train_indices),
                              "test_examples": len(task.test_indices), "epochs": epochs,
                              "steps": trainer.steps_in_task(task, epochs) if epochs else 0})
            return {"method": trainer.method.name,
                    "method_config": dataclasses.asdict(trainer.method.config),
                    "dataset": config.dataset.name, "scenario": trainer.scenario.kind,
                    "class_order": order, "tasks": tasks,
                    "trainable_params": int(trainer.method.count_trainable(trainable, state)),
                    "state_size": count_params(state),
                    "backbone": {"name": trainer.backbone.config.name,
                                 "params": count_params(trainer.frozen),
                                 "fingerprint": trainer.fingerprint},
                    "devices": int(trainer.mesh.size), "processes": int(jax.process_count()),
                    "config": config.to_dict()}
        finally:
            trainer.close()


def check_modality(scenario: scenarios.Scenario, backbone: Any) -> None:
    """The data must be what the backbone reads (texts for a text encoder, images for the
    ViT): caught before anything runs, with the two fields to change."""
    for task in scenario.tasks:
        for source in (task.train_source, task.test_source):
            if source.modality != backbone.modality:
                article = "an" if backbone.modality == "image" else "a"
                raise ValueError(
                    f"dataset {source.name!r} holds {source.modality} data but "
                    f"backbone.checkpoint gives {article} {backbone.modality} backbone "
                    f"({backbone.config.name}); pair text datasets (wordnet, trec, bbc, "
                    f"vader:<domain>) with a text checkpoint ('minilm', a BERT folder) and "
                    f"image datasets with a ViT")


def check_batch_groups(method: Method, batch_sizes: Mapping[str, int],
                       refuse: bool = True) -> None:
    """Groups of ``method.batch_groups`` examples (the official code's per-device batch)
    are the official groups only where every batch holds whole groups: a DualPrompt eval
    batch of 256 with votes in groups of 24 would end in a group of 16 and shift every
    later group of the task's test set against the official ones. ``refuse=False`` (the
    evaluation of a saved run, whose sizes are the run's): a warning instead, for the
    sizes given."""
    for field, (group, option) in method.batch_groups.items():
        size = batch_sizes.get(field)
        if size is None or not size % group:
            continue
        problem = (f"{field}={size} is not a multiple of {method.name}'s groups of {group} "
                   f"examples (the official per-device batch, {option}={group}): the last "
                   f"group of every batch is cut short")
        if not refuse:
            log.warning("%s; results differ from the official grouping", problem)
            continue
        raise ValueError(f"{problem}; set --config.{field} to a multiple of {group} (e.g. "
                         f"{max(group, size // group * group)}), or {option}=0 for one group "
                         f"per batch")


def under_matmul_precision(method: Callable) -> Callable:
    """A trainer method run under the config's ``matmul_precision``: JAX's default precision
    of float32 matmuls for everything it traces (a compiled program keeps the precision it
    was traced with, and JAX's caches key on it)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        precision = self.config.get("matmul_precision", "default")
        if precision == "default":
            return method(self, *args, **kwargs)
        with jax.default_matmul_precision(precision):
            return method(self, *args, **kwargs)
    return wrapper


class ContinualTrainer:
    """Holds the run's static pieces (mesh, backbone, scenario, method) and runs tasks."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 write_metrics: bool = True, attention_fallback: bool = False,
                 evaluating: bool = False):
        """``attention_fallback``: where the config asks for cuDNN's attention and the
        devices are not GPUs, use XLA's (the same function) instead of refusing -- for
        evaluating or planning a GPU run on another machine, never for training.
        ``evaluating``: the trainer evaluates a saved run (``pecft_jax.evaluate``), whose
        config it cannot change: an eval batch that cuts the method's batch groups is a
        warning, and the train batch is not checked."""
        self.config = config
        self.workdir = workdir
        check_run_config(config)
        asked_attention = config.backbone.get("attention", "einsum")
        vit.check_execution(config.backbone.get("dtype", "float32"), asked_attention)
        compilation.enable_persistent_cache(
            config.get("compilation_cache_dir", compilation.DEFAULT_CACHE_DIR))
        self.lr_mults = partition.parse_lr_mults(config.train.get("lr_mults", ()))
        # one optimizer for the whole run ('run') or a fresh one per task ('task')
        self.run_scoped = config.train.get("optimizer_scope", "task") == "run"
        self.on_nonfinite = config.train.get("on_nonfinite", "stop")
        distributed = distributed_settings(config)
        mesh_lib.split_host(config.get("host_devices", 0))  # before JAX's backends start
        if distributed is not None:
            mesh_lib.initialise_distributed(**distributed)
        self.mesh = mesh_lib.make_mesh(config.get("num_devices", None))
        self.logs_metrics = write_metrics and jax.process_index() == 0
        if self.logs_metrics:
            check_wandb_installed(config)
        self.batch_size = config.train.batch_size
        # an epoch's last partial batch: dropped, or kept padded and masked (pipeline.py)
        self.drop_last = bool(config.train.get("drop_last", True))
        mesh_lib.check_batch_size(self.batch_size, self.mesh, "train.batch_size")
        self.eval_batch_size = config.get("eval", {}).get("batch_size", self.batch_size)
        mesh_lib.check_batch_size(self.eval_batch_size, self.mesh, "eval.batch_size")
        backbone_config = config.backbone
        attention = attention_for_devices(asked_attention, self.mesh.devices.flat,
                                          attention_fallback)
        if attention != asked_attention:
            log.warning("backbone.attention=%r needs NVIDIA GPUs; these devices are not: "
                        "using %r (the same function)", asked_attention, attention)
            backbone_config = ml_collections.ConfigDict(dict(backbone_config.to_dict(),
                                                             attention=attention))
        self.backbone, frozen = backbone_from_config(backbone_config, config.seed)
        self.fingerprint = fingerprint(frozen)
        self.frozen = mesh_lib.replicate(frozen, self.mesh)
        self.scenario = scenarios.build_scenario(config)
        check_modality(self.scenario, self.backbone)
        self.label_map = self.scenario.label_map()
        self.joint = bool(config.scenario.get("joint", False))
        self.future_tasks = bool(config.eval.get("future_tasks", False))
        self.fwt_reference = config.eval.get("fwt_reference", "")
        self.tasks = self.training_tasks()
        self.method: Method = create_method(config.method.name, config.method, self.backbone,
                                            self.scenario.num_classes, len(self.tasks))
        check_batch_groups(self.method, {"eval.batch_size": self.eval_batch_size} if evaluating
                           else {"train.batch_size": self.batch_size,
                                 "eval.batch_size": self.eval_batch_size},
                           refuse=not evaluating)
        if self.future_tasks and not self.method.scores_unlearnt_classes:
            raise ValueError(f"eval.future_tasks with {self.method.name}: its logits mask the "
                             f"classes of tasks not learnt yet, so the accuracy on a future task "
                             f"(and FWT) would measure the mask, not transfer; leave "
                             f"eval.future_tasks and eval.fwt_reference unset for this method")
        self.read_options = loader.ReadOptions(
            threads=int(config.train.get("read_threads", 2)),
            processes=int(config.train.get("read_processes", 0)),
            prefetch=int(config.train.get("prefetch", 2)))
        # the fixed-order passes start an iterator per pass: no worker processes to start
        self.pass_read_options = dataclasses.replace(self.read_options, processes=0)
        self.train_preprocess, self.eval_preprocess = self._preprocesses()
        self.feature_cache, self.cached_kinds = self._plan_feature_cache(
            config.get("feature_cache", ml_collections.ConfigDict()))
        # exactly what the method computes when no cached value is in the batch
        self._query_features = compiler.jit(
            lambda frozen, inputs: frozen_query(self.backbone, frozen, {"inputs": inputs}))
        self._fixed_features = compiler.jit(self.method.fixed_features)
        self.trace_counts: Dict[str, int] = {}
        self._compiled: Dict[tuple, Callable] = {}  # jitted steps, reused across tasks
        self._task_data_compiled: Dict[tuple, Callable] = {}  # the methods' TaskData passes
        self._reads_inputs: Dict[tuple, bool] = {}  # see _logits_read_inputs
        self.config_hash = config_hash(config)
        self.base_rng = jax.random.key(config.seed)
        self.writer = MetricWriter(workdir, enabled=self.logs_metrics,
                                   wandb=config.get("wandb"), config=config.to_dict())
        self.checkpointer = Checkpointer(workdir)
        self._stop_signal: Optional[int] = None  # SIGTERM / SIGINT received (see run)

    # ====================================================================== the run
    @under_matmul_precision
    def run(self) -> dict:
        previous = self._catch_stop_signals()
        try:
            run, position = self.restore_or_init()
            if jax.process_index() == 0:  # after the resume checks: `evaluate` rebuilds from it
                write_text_atomic(os.path.join(self.workdir, "config.json"),
                                  self.config.to_json(indent=1))
            self.writer.text("config", self.config.to_json(indent=1), run.global_step)
            if (self.fwt_reference == "init" and run.reference is None
                    and position.task == 0 and not position.inside):
                self.record_reference(run)
            for t in range(position.task, len(self.tasks)):
                self.learn_task(run, t, position if t == position.task else Position(t))
                if t + 1 < len(self.tasks) and self.stop_requested():
                    raise self._preempted(f"after task {t} (0-based), whose checkpoint tasks/{t} "
                                          f"is written")
            results = self.results(run)
            self.writer.hparams(results["config"], {
                "hparam/average_accuracy": results["metrics"]["average_accuracy"],
                "hparam/forgetting": results["metrics"].get("forgetting"),
                "hparam/task_il_average_accuracy":
                    results["task_il_metrics"].get("average_accuracy")})
            return results
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    # ================================================================= preemption
    def _catch_stop_signals(self) -> dict:
        """SIGTERM (a TPU VM's or a cluster's preemption notice) and SIGINT (Ctrl-C) ask the
        run to stop at the next step it can checkpoint: the step's checkpoint is written and
        :class:`Preempted` raised; re-running the command resumes there exactly. A second
        Ctrl-C interrupts at once. Returns the previous handlers (restored by ``run``)."""
        if threading.current_thread() is not threading.main_thread():
            return {}  # Python delivers signals to the main thread only

        def request_stop(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
            self._stop_signal = signum
            log.warning("%s received: the run stops after writing a checkpoint at its next step "
                        "(Ctrl-C again to stop at once)", signal.Signals(signum).name)

        return {signum: signal.signal(signum, request_stop)
                for signum in (signal.SIGTERM, signal.SIGINT)}

    def stop_requested(self) -> bool:
        """A stop signal reached this process -- or, in a multi-process run, any process
        (all of them must write the checkpoint together; a collective, so every process
        asks at the same steps)."""
        asked = self._stop_signal is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            asked = bool(np.any(multihost_utils.process_allgather(np.int32(asked))))
        return asked

    def _preempted(self, where: str) -> "Preempted":
        signum = self._stop_signal if self._stop_signal is not None else signal.SIGTERM
        return Preempted(signum, f"stopped by {signal.Signals(signum).name} {where}; re-run "
                                 f"the same command to resume from it")

    def learn_task(self, run: RunState, t: int, position: Position) -> None:
        """before_task -> gradient steps -> after_task -> evaluation -> checkpoint."""
        spec, task = self.task_spec(t), self.tasks[t]
        task_rng = jax.random.fold_in(self.base_rng, t)
        run.task_started = time.time() - (position.seconds_in_task if position.inside else 0.0)
        epochs = self.epochs(spec)
        steps = self.steps_in_task(task, epochs) if epochs else 0
        queries = self.training_queries(task, epochs)
        data = self.task_data(task, queries)
        if not position.inside:  # before_task already ran for a task resumed inside
            run.trainable, run.state = self.method.before_task(
                spec, run.trainable, run.state, self.frozen, data, jax.random.fold_in(task_rng, 0))
        if steps:
            self.train(run, task, spec, epochs, jax.random.fold_in(task_rng, 1), position,
                       queries)
        run.trainable, run.state = self.method.after_task(
            spec, run.trainable, run.state, self.frozen, data, jax.random.fold_in(task_rng, 2))
        bad = nonfinite_leaves({"trainable": run.trainable, "state": run.state})
        if bad:
            raise NonFiniteError(
                f"task {t} (0-based) ended with non-finite values in {bad[:3]} after its "
                f"after_task; nothing of it was checkpointed (the last checkpoint stays the "
                f"last good one). Check the method's statistics and hyper-parameters.")
        if self.feature_cache is not None:
            self.feature_cache.drop(f"query/train/{task.index}")
        run.seconds_per_task.append(time.time() - run.task_started)
        self.record(run, t, self.evaluate(run, t, future=self.future_tasks))
        self.checkpointer.save(task_end=True, step=t, trainable=run.trainable, state=run.state,
                               opt_state=None, rng=self.base_rng,
                               meta=self._meta(run, t, steps, True))

    def restore_or_init(self) -> Tuple[RunState, Position]:
        """The run's state and where it continues, from the newest checkpoint in the workdir:

        1. none: ``method.init``; task 0, step 0.
        2. one from another backbone, config or method: :class:`CheckpointMismatch`.
        3. the end of task t: its trainable tree, state and matrices; task t+1 starts from
           ``before_task``.
        4. inside task t at step s (saved every ``train.checkpoint_every_steps``): also the
           optimizer state; task t continues at step s (``before_task`` already ran).
        """
        resume = self.checkpointer.latest()
        if resume is None:
            # a run that crashed before its first checkpoint starts over, and so does its log
            dropped = self.writer.discard_after(-1)
            if dropped:
                log.warning("no checkpoint in %s: the run starts over, and metrics.jsonl "
                            "with it (%d earlier records dropped)", self.workdir, dropped)
            rng = jax.random.fold_in(self.base_rng, 10 ** 6)
            # One compiled program, not one eager compilation per parameter shape, and
            # without LLVM's optimisations: it runs once, and XLA:CPU spends ~1 s optimising
            # each random draw's unrolled threefry (L2P 2.8 -> 0.7 s, HiDe-Prompt 6.4 -> 2.9 s).
            # Draws may differ in the last bit from an optimised build (no FMA contraction).
            init = jax.jit(self.method.init).lower(rng, self.frozen).compile(
                compiler_options={"xla_backend_optimization_level": 0})
            trainable, state = init(rng, self.frozen)
            return RunState(trainable, state, [], [], {}, []), Position()
        kind, ckpt_step, meta = resume
        self.check_meta(meta)
        self.check_layout(meta)
        run = RunState(None, None, meta["accuracy_matrix"], meta["task_il_accuracy_matrix"],
                       meta.get("extra_rows", {}), meta["seconds_per_task"], meta["global_step"],
                       skipped_steps=int(meta.get("skipped_nonfinite_steps", 0)),
                       confusion=meta.get("confusion"),
                       reference=meta.get("reference_accuracy"))
        if kind == "tasks":
            restored = self.checkpointer.restore(kind, ckpt_step)
            position = Position(meta["task"] + 1)
        else:
            # The optimizer's structure depends on the restored trainable tree: read the
            # trees first, then the optimizer state against a freshly initialised one.
            t = meta["task"]
            trees = self.checkpointer.restore(kind, ckpt_step)
            spec = self.task_spec(t)
            optimizer = self.optimizer(spec, trees["trainable"], self.tasks[t], self.epochs(spec))
            # its structure only: an eager init would compile a program per leaf shape, which
            # the run that wrote the checkpoint never compiled (no cache holds them)
            target = jax.eval_shape(optimizer.init, trees["trainable"])
            restored = self.checkpointer.restore(kind, ckpt_step, opt_state_target=target)
            opt_state = restored["opt_state"]  # None when the optimizer keeps no arrays
            position = Position(t, meta["step_in_task"],
                                target if opt_state is None else opt_state, inside=True,
                                seconds_in_task=float(meta.get("seconds_in_task", 0.0)),
                                input_state=meta.get("input_iterator"))
        run.trainable, run.state = restored["trainable"], restored["state"]
        # what the crashed run logged after this checkpoint is logged again from here
        self.writer.discard_after(meta["global_step"], position.task)
        log.info("resuming from checkpoint %s/%d (task %d, step %d)", kind, ckpt_step,
                 position.task, position.step)
        return run, position

    # ================================================================= gradient steps
    def train(self, run: RunState, task: scenarios.Task, spec: TaskSpec, epochs: int, rng,
              position: Position, queries: Optional[np.ndarray] = None) -> None:
        """``epochs`` epochs of ``method.update`` on the task's augmented training batches
        (with their cached frozen queries, if ``queries``)."""
        t = spec.index
        steps = self.steps_in_task(task, epochs)
        optimizer = self.optimizer(spec, run.trainable, task, epochs)
        trainable = mesh_lib.replicate(run.trainable, self.mesh)
        state = mesh_lib.replicate(self.method.step_state(run.state), self.mesh)
        # the run's updates before this task, where a run-long optimizer's counts continue
        # (a skipped non-finite step kept the optimizer state as it was)
        steps_before = run.global_step - position.step - run.skipped_steps
        opt_state = (mesh_lib.replicate(position.opt_state, self.mesh) if position.inside
                     else self.initial_optimizer_state(spec, optimizer, epochs, steps, trainable,
                                                       steps_before))
        train_step = self.compiled_train_step(spec, optimizer, epochs, steps)
        task_arg = self.traced_task(spec)
        every = int(self.config.train.get("checkpoint_every_steps", 0) or 0)
        log_every = int(self.config.train.get("log_every_steps", 20) or 20)
        schedule = self.logged_schedule(spec, optimizer, epochs, steps)
        bar = progress(total=steps, initial=position.step,
                       desc=f"task {t} [0-{len(self.tasks) - 1}]",
                       enabled=self.config.get("progress_bar", True) and jax.process_index() == 0)
        step, tick, examples_seen = position.step, time.time(), 0
        health = mesh_lib.replicate(np.array([-1, run.skipped_steps], np.int32), self.mesh)
        batches = pipeline.TrainBatches(
            task.train_source, task.train_indices, self.label_map, batch_size=self.batch_size,
            seed=self.task_seed(t), preprocess=self.train_preprocess, epochs=epochs,
            process_index=jax.process_index(), process_count=jax.process_count(),
            drop_last=self.drop_last,
            cross_epochs=bool(self.config.train.get("batches_cross_epochs", False)),
            reshuffle=bool(self.config.train.get("reshuffle_each_epoch", True)))
        # host-side reading and augmentation run in grain's threads (and worker processes),
        # ahead of the device steps; a resumed task continues from the saved iterator state
        batch_iterator, read_start = loader.resume(
            batches, self.read_options, position.input_state if position.inside else None,
            step)
        try:
            for local in batch_iterator:
                batch = mesh_lib.shard_batch(with_cached(local, {FROZEN_QUERY: queries}),
                                             self.mesh)
                trainable, state, opt_state, metrics, health = train_step(
                    trainable, state, opt_state, self.frozen, batch, rng, np.int32(step), task_arg,
                    health)
                step += 1
                # health: an output of the step that the next one does not donate
                compiler.bound_queue(step - position.step, health)
                run.global_step += 1
                examples_seen += batches.examples_in(step - 1)
                if step % log_every == 0 or step == steps:
                    self._check_health(run, t, health)
                    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    host["examples_per_sec"] = examples_seen / max(time.time() - tick, 1e-9)
                    # the base rate of this step's update (parameter groups scale it)
                    host["learning_rate"] = learning_rate_at(
                        schedule, step - 1 + (steps_before if self.run_scoped else 0))
                    tick, examples_seen = time.time(), 0
                    self.writer.write(run.global_step, {f"train/{k}": v for k, v in host.items()},
                                      task=t)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in host.items()})
                bar.update(1)
                # a multi-process run agrees on stopping at logged steps (a collective)
                stop = step < steps and (jax.process_count() == 1 or step % log_every == 0) \
                    and self.stop_requested()
                if (every and step % every == 0 and step < steps) or stop:
                    self._check_health(run, t, health)  # never a checkpoint of diverged values
                    meta = self._meta(run, t, step, False)
                    meta["input_iterator"] = loader.checkpoint_state(
                        batch_iterator, self.read_options, read_start, step)
                    self.checkpointer.save(task_end=False, step=run.global_step,
                                           trainable=trainable,
                                           state=merge_state(run.state, state),
                                           opt_state=opt_state, rng=self.base_rng, meta=meta)
                if stop:
                    bar.close()
                    raise self._preempted(f"at step {step} of task {t} (0-based); checkpoint "
                                          f"latest/{run.global_step} is written")
        finally:
            loader.close(batch_iterator)
        if step != steps:
            raise RuntimeError(f"task {t}'s batches ended at step {step} of {steps}")
        bar.close()
        self._check_health(run, t, health)
        run.trainable = mesh_lib.to_host(trainable)
        run.state = merge_state(run.state, mesh_lib.to_host(state))

    def compiled_train_step(self, spec: TaskSpec, optimizer: partition.RoutedOptimizer,
                            epochs: int, steps: int) -> Callable:
        """The jitted ``method.update`` for this task, shared by every task that has the same
        optimizer labels and schedule (the task index is an input, see :meth:`traced_task`).
        Its signature: ``(trainable, state, opt_state, frozen, batch, task_rng, step, task,
        health) -> (trainable, state, opt_state, metrics, health)``; the step's key is
        ``fold_in(task_rng, step)``, derived on the device (an eager ``fold_in`` on the host
        would wait for the previous step); ``health`` is :func:`guard_nonfinite`'s record."""
        key = ("train",) + self._optimizer_key(spec, optimizer, epochs, steps)
        if key not in self._compiled:
            method = self.method

            skip = self.on_nonfinite == "skip_step"

            def train_step(trainable, state, opt_state, frozen, batch, task_rng, step, task,
                           health):
                self._count_trace("train_step", task)
                new = method.update(trainable, state, opt_state, frozen, batch,
                                    jax.random.fold_in(task_rng, step), task, optimizer)
                return guard_nonfinite(new, (trainable, state, opt_state), step, health, skip)

            replicated = mesh_lib.replicated(self.mesh)
            self._compiled[key] = compiler.jit(
                train_step, donate_argnums=(0, 1, 2), static_argnums=self._task_argnums(7),
                out_shardings=(replicated,) * 5)
        return self._compiled[key]

    def _optimizer_key(self, spec: TaskSpec, optimizer: partition.RoutedOptimizer,
                       epochs: int, steps: int) -> tuple:
        """What a task's optimizer is built from: tasks with the same key share its compiled
        train step (the task index is an input; the schedule's lengths and the groups' start
        steps are optimizer state)."""
        labels, structure = jax.tree_util.tree_flatten(optimizer.labels)
        per_epoch = steps // max(1, epochs)
        return (self._task_key(spec), tuple(labels), structure,
                tuple(label for label, _ in self.group_start_steps(spec, per_epoch)))

    def _lengths_key(self, spec: TaskSpec, epochs: int, steps: int) -> tuple:
        """What the programs that write the optimizer state or evaluate the schedule bake in
        as constants: the schedule's lengths and the groups' start steps."""
        per_epoch = steps // max(1, epochs)
        return (schedule_lengths(self.config.train, steps, per_epoch),
                self.group_start_steps(spec, per_epoch))

    def initial_optimizer_state(self, spec: TaskSpec, optimizer: partition.RoutedOptimizer,
                                epochs: int, steps: int, trainable: Any,
                                steps_before: int = 0) -> Any:
        """``optimizer.init(trainable)``, replicated: one jitted program shared like the
        train step (run eagerly, its zeros compiled a program per leaf shape). Its key adds
        the schedule's lengths and the groups' start steps, which the train step reads from
        the optimizer state but this program bakes in as constants
        (``partition.with_lengths``, ``partition.start_after``). Under
        ``train.optimizer_scope='run'`` the counts continue from ``steps_before``, the
        run's updates before this task (an input: one program for every task)."""
        key = (("optimizer_init",) + self._optimizer_key(spec, optimizer, epochs, steps)
               + self._lengths_key(spec, epochs, steps)
               + (self.run_long_groups(spec, optimizer),))
        if key not in self._compiled:
            groups = self.run_long_groups(spec, optimizer)

            def init(trainable, steps_before):
                state = optimizer.init(trainable)
                return (state if groups is None
                        else partition.continue_counts(state, steps_before, groups))

            self._compiled[key] = compiler.jit(
                init, out_shardings=mesh_lib.replicated(self.mesh))
        return self._compiled[key](trainable, np.int32(steps_before))

    def run_long_groups(self, spec: TaskSpec, optimizer: partition.RoutedOptimizer
                        ) -> Optional[Tuple[str, ...]]:
        """``None`` under ``train.optimizer_scope='task'`` (a fresh optimizer per task);
        under ``'run'`` the groups whose Adam step count continues over the run
        (:meth:`Method.run_long_groups`, and the groups ``train.lr_mults`` derives from
        them), while every group's schedule continues (:func:`partition.continue_counts`)."""
        if not self.run_scoped:
            return None
        named = set(self.method.run_long_groups(spec))
        used = {label for _, label in partition.iter_leaves(optimizer.labels)}
        return tuple(sorted(label for label in used if partition.base_label(label) in named))

    def logged_schedule(self, spec: TaskSpec, optimizer: partition.RoutedOptimizer,
                        epochs: int, steps: int) -> Any:
        """``train.schedule`` for the logs (the base rate of each update): a number, or a
        jitted function of the step shared like the train step (evaluated eagerly, each
        operation in it compiled a program of its own)."""
        schedule = make_schedule(self.config.train, steps, steps // max(1, epochs))
        if not callable(schedule):
            return schedule
        key = (("logged_schedule",) + self._optimizer_key(spec, optimizer, epochs, steps)
               + self._lengths_key(spec, epochs, steps))
        if key not in self._compiled:
            self._compiled[key] = compiler.jit(schedule)
        return self._compiled[key]

    def traced_task(self, spec: TaskSpec) -> TaskSpec:
        """The task as the jitted steps take it: its index an int32 input -- one compiled
        program for every task -- or, for a ``static_task`` method, the concrete spec."""
        return spec if self.method.static_task else dataclasses.replace(
            spec, index=np.int32(spec.index))

    def _task_key(self, spec: TaskSpec) -> Any:
        return spec if self.method.static_task else None

    def _task_argnums(self, position: int) -> Tuple[int, ...]:
        return (position,) if self.method.static_task else ()

    def optimizer(self, spec: TaskSpec, trainable: dict, task: scenarios.Task,
                  epochs: int) -> partition.RoutedOptimizer:
        """The method's labels refined by ``train.lr_mults``, each label's group built on the
        configured base optimizer, the gradients of all groups clipped together to
        ``train.grad_clip_norm`` first (one global norm, as the official codes clip)."""
        steps = self.steps_in_task(task, epochs)
        base = make_base_optimizer(self.config.train, steps, steps // epochs)
        labels, derived = partition.apply_lr_mults(self.method.param_labels(trainable, spec),
                                                   self.lr_mults)
        groups = dict(self.method.optimizer_groups(spec, base))
        for name, (label, mult) in derived.items():
            if label in groups:
                groups[name] = optax.chain(groups[label], optax.scale(mult))
        for label, start in self.group_start_steps(spec, steps // epochs):
            if label not in groups:
                raise ValueError(f"method {self.method.name}: group_start_epochs names "
                                 f"{label!r}, which is not one of its groups {sorted(groups)}")
            groups[label] = partition.start_after(groups[label], start)
        try:
            return partition.make_optimizer(labels, groups,
                                            clip_norm=self.config.train.get("grad_clip_norm"))
        except ValueError as err:
            raise ValueError(f"method {self.method.name}: {err}") from None

    def group_start_steps(self, spec: TaskSpec, steps_per_epoch: int) -> tuple:
        """``((label, first step), ...)`` of the groups the method starts after the task's
        first step (:meth:`Method.group_start_epochs`)."""
        starts = self.method.group_start_epochs(spec)
        return tuple(sorted((label, int(epoch) * int(steps_per_epoch))
                            for label, epoch in starts.items() if epoch > 0))

    def epochs(self, spec: TaskSpec) -> int:
        epochs = self.method.train_epochs(spec, int(self.config.train.epochs))
        if not isinstance(epochs, (int, np.integer)) or epochs < 0:
            raise ValueError(f"method {self.method.name}: train_epochs must return an int >= 0, "
                             f"got {epochs!r} for task {spec.index}")
        return int(epochs)

    def steps_in_task(self, task: scenarios.Task, epochs: int) -> int:
        per_epoch = pipeline.steps_per_epoch(len(task.train_indices), self.batch_size,
                                             self.drop_last)
        if per_epoch == 0:
            raise ValueError(f"task {task.index} has {len(task.train_indices)} training examples, "
                             f"fewer than one batch of {self.batch_size}; lower train.batch_size"
                             + (" or keep the partial batch (train.drop_last=False)"
                                if len(task.train_indices) else ""))
        return per_epoch * epochs

    # ===================================================================== evaluation
    @under_matmul_precision
    def evaluate(self, run: RunState, t: int, split: str = "test",
                 predictions: bool = False, future: bool = False) -> Dict[str, Any]:
        """Accuracy (%) on the test data of tasks 0..t (all tasks for joint training), read
        as one stream -- one padded batch in all, not one per task -- and split by task.
        Padding rows do not take part in batch-wise choices (``inputs['mask']``).
        ``split='train'``: on their training data instead (un-augmented); ``predictions``:
        the row also holds every example's task, label, class-IL prediction (original class
        ids) and logits over the seen classes, under ``'predictions'``. ``future``: the
        tasks after t too, each one's class-IL accuracy over the classes of the tasks up to
        and including it (those known once it is learnt; ``t = -1``: before any task is
        learnt, FWT's reference row). With ``eval.class_il_classes='all'`` every class-IL
        choice (accuracy, top-5, prediction, confusion) is over every class of the run.
        Old/new-class accuracy, the confusion matrix and predictions cover tasks 0..t."""
        if split not in ("test", "train"):
            raise ValueError(f"split must be 'test' or 'train', got {split!r}")

        def data(task):
            return ((task.test_source, task.test_indices) if split == "test"
                    else (task.train_source, task.train_indices))

        spec = self.task_spec(min(max(t, 0), len(self.tasks) - 1))
        eval_step, task_arg = self.compiled_eval_step(spec), self.traced_task(spec)
        learnt = self.scenario.tasks if self.joint else self.scenario.tasks[:t + 1]
        eval_tasks = self.scenario.tasks if (self.joint or future) else learnt
        seen = sorted({c for task in learnt for c in task.classes})
        # every class of the run, where class-IL predictions choose among all of them
        every = (list(range(self.scenario.num_classes))
                 if self.config.eval.get("class_il_classes", "seen") == "all" else None)
        choices = every or seen  # what a learnt task's class-IL prediction chooses among
        # on the devices once: host arrays given to the jitted step would be copied to every
        # device again at each batch
        trainable = mesh_lib.replicate(run.trainable, self.mesh)
        state = mesh_lib.replicate(self.method.step_state(run.state), self.mesh)
        # one stream over all tasks, unless predictions depend on the batch's other examples
        groups = ([[task] for task in eval_tasks] if self.method.predictions_depend_on_batch
                  else [eval_tasks])
        logits, labels, task_pred = [], [], []
        for group in groups:
            cached = ({FROZEN_QUERY: self.test_queries(group),
                       FIXED_FEATURES: self.test_fixed_features(group, t, trainable),
                       TASK_FEATURES: self.test_task_features(group, t, trainable, state)}
                      if split == "test" else {})
            cached = {key: rows for key, rows in cached.items() if rows is not None}
            # from cached features alone (SimpleCIL, RanPAC, APER), the images are not read
            read_inputs = not cached or self._logits_read_inputs(trainable, state, task_arg,
                                                                 cached)
            for local in self._fixed_batches([data(task) for task in group], read_inputs):
                batch = mesh_lib.shard_batch(with_cached(local, cached), self.mesh)
                inputs = {k: batch[k] for k in ("inputs", "mask", FROZEN_QUERY, FIXED_FEATURES,
                                                TASK_FEATURES) if k in batch}
                out = self._gather(eval_step(trainable, state, self.frozen, inputs, task_arg))
                keep = np.asarray(self._gather(batch["mask"])) > 0
                logits.append(out["logits"][keep])
                labels.append(np.asarray(self._gather(batch["label"]))[keep])
                if "task_pred" in out:
                    task_pred.append(out["task_pred"][keep])
        logits_np, labels_np = np.concatenate(logits), np.concatenate(labels)
        pred_np = np.concatenate(task_pred) if task_pred else None
        bounds = np.cumsum([0] + [len(data(task)[1]) for task in eval_tasks])
        row: Dict[str, Any] = {"class_il": [], "task_il": [], "class_il_top5": []}
        for i, (task, lo, hi) in enumerate(zip(eval_tasks, bounds[:-1], bounds[1:])):
            known = choices if i < len(learnt) else every or sorted(  # known once learnt
                {c for earlier in eval_tasks[:i + 1] for c in earlier.classes})
            row["class_il"].append(metrics_lib.class_incremental_accuracy(
                logits_np[lo:hi], labels_np[lo:hi], known))
            row["task_il"].append(metrics_lib.task_incremental_accuracy(
                logits_np[lo:hi], labels_np[lo:hi], task.classes))
            row["class_il_top5"].append(metrics_lib.top_k_accuracy(
                logits_np[lo:hi], labels_np[lo:hi], known, 5))
            # task-identity accuracy (prompt / domain selection); joint training has one
            # task, so there is no identity to infer
            if pred_np is not None and not self.joint:
                row.setdefault("task_identity", []).append(
                    100.0 * float(np.mean(pred_np[lo:hi] == task.index)))
        if not learnt:  # the reference row: nothing learnt, nothing else to say
            return row
        # what follows is about the learnt tasks (the stream's first examples)
        learnt_end = int(bounds[len(learnt)])
        logits_np, labels_np = logits_np[:learnt_end], labels_np[:learnt_end]
        bounds = bounds[:len(learnt) + 1]
        predicted = metrics_lib.class_il_predictions(logits_np, choices)
        if not self.joint:  # the classes learnt before task t, and task t's own
            new = set(self.scenario.tasks[t].classes)
            row["old_new_class_il"] = [
                metrics_lib.subset_accuracy(labels_np, predicted, sorted(set(seen) - new)),
                metrics_lib.subset_accuracy(labels_np, predicted, sorted(new))]
        row["confusion"] = {"classes": [int(c) for c in choices],
                            "matrix": metrics_lib.confusion_matrix(labels_np, predicted,
                                                                   choices).tolist()}
        if predictions:
            order = np.asarray(self.scenario.class_order)
            row["predictions"] = {
                "task": np.repeat([task.index for task in learnt], np.diff(bounds)),
                "label": order[labels_np], "prediction": order[predicted],
                "seen_classes": order[np.asarray(seen)], "logits": logits_np[:, seen]}
        return row

    def _logits_read_inputs(self, trainable, state, task, cached: Mapping[str, np.ndarray]
                            ) -> bool:
        """Whether ``method.logits`` reads ``batch['inputs']`` when the batch holds the
        ``cached`` features: found once per set of cached kinds (and per task for a
        ``static_task`` method) by tracing it on shapes alone (``jax.eval_shape``) without
        the inputs -- a method that needs them raises KeyError('inputs') there, before
        anything compiles."""
        kinds = tuple(sorted(cached))
        memo = (kinds, task if self.method.static_task else None)
        if memo not in self._reads_inputs:
            rows = self.eval_batch_size
            batch = {"mask": jax.ShapeDtypeStruct((rows,), jnp.float32),
                     **{key: jax.ShapeDtypeStruct((rows,) + cached[key].shape[1:], jnp.float32)
                        for key in kinds}}
            method = self.method
            if method.static_task:  # a concrete spec, as the eval step's static argument
                logits, task_args = (lambda *args: method.logits(*args, task)), ()
            else:
                logits, task_args = method.logits, (task,)
            try:
                jax.eval_shape(logits, trainable, state, self.frozen, batch, *task_args)
                self._reads_inputs[memo] = False
            except KeyError as error:
                if error.args != ("inputs",):
                    raise
                self._reads_inputs[memo] = True
        return self._reads_inputs[memo]

    def compiled_eval_step(self, spec: TaskSpec) -> Callable:
        """The jitted ``method.logits``, one for the run unless the method is
        ``static_task``. Its signature: ``(trainable, state, frozen, inputs, task)``, inputs
        ``{'inputs', 'mask'[, 'frozen_query', 'fixed_features', 'task_features']}``."""
        key = ("eval", self._task_key(spec))
        if key not in self._compiled:
            method = self.method

            def eval_step(trainable, state, frozen, inputs, task):
                self._count_trace("eval_step", task)
                out = method.logits(trainable, state, frozen, inputs, task)
                if method.infers_task:
                    logits, task_pred = out
                    return {"logits": logits, "task_pred": task_pred}
                return {"logits": out}

            self._compiled[key] = compiler.jit(eval_step, static_argnums=self._task_argnums(4))
        return self._compiled[key]

    def compiled_task_features(self, spec: TaskSpec) -> Callable:
        """The jitted ``method.task_features`` (one for the run unless the method is
        ``static_task``): ``(trainable, state, frozen, inputs, task)`` -> float32 features of
        task ``task``'s pass."""
        key = ("task_features", self._task_key(spec))
        if key not in self._compiled:
            method = self.method

            def task_features(trainable, state, frozen, inputs, task):
                self._count_trace("task_features", task)
                return method.task_features(trainable, state, frozen, inputs,
                                            task).astype(jnp.float32)

            self._compiled[key] = compiler.jit(task_features,
                                               static_argnums=self._task_argnums(4))
        return self._compiled[key]

    def record(self, run: RunState, t: int, row: Dict[str, List[float]]) -> None:
        run.accuracy_matrix.append(row["class_il"])
        run.task_il_matrix.append(row["task_il"])
        run.confusion = row.pop("confusion", None)
        for key, values in row.items():
            if key not in ("class_il", "task_il"):
                run.extra_rows.setdefault(key, []).append(values)
        learnt = len(row["class_il"]) if self.joint else t + 1
        scalars = {}
        for kind in ("class_il", "task_il"):
            for j, value in enumerate(row[kind]):  # tasks not learnt yet (eval.future_tasks)
                scalars[f"eval/{'future_' if j >= learnt else ''}{kind}_task{j}"] = value
        scalars["eval/average_accuracy"] = float(np.mean(row["class_il"][:learnt]))
        scalars["eval/task_il_average_accuracy"] = float(np.mean(row["task_il"][:learnt]))
        self.writer.write(run.global_step, scalars, task=t)
        log.info("task %d: class-IL %s", t, " ".join(f"{v:.1f}" for v in row["class_il"]))

    def record_reference(self, run: RunState) -> None:
        """FWT's reference: every task evaluated before any is learnt (``fwt_reference``
        'init': the pretrained backbone with the method's initial parameters)."""
        row = self.evaluate(run, -1, future=True)
        run.reference = {"class_il": row["class_il"], "task_il": row["task_il"]}
        self.writer.write(run.global_step, {f"eval/reference_{kind}_task{j}": value
                                            for kind, values in run.reference.items()
                                            for j, value in enumerate(values)})
        log.info("reference (before task 0): class-IL %s",
                 " ".join(f"{v:.1f}" for v in row["class_il"]))

    def results(self, run: RunState) -> dict:
        matrix, task_il = run.accuracy_matrix, run.task_il_matrix
        if self.joint:  # one row over all tasks: only the final accuracy is defined
            summary = {"average_accuracy": float(np.mean(matrix[-1])),
                       "average_incremental_accuracy": None, "forgetting": None,
                       "nonnegative_forgetting": None, "bwt": None}
            task_summary = {"average_accuracy": float(np.mean(task_il[-1]))}
        else:
            sizes = [len(task.test_indices) for task in self.scenario.tasks]
            reference = run.reference or {}
            summary = metrics_lib.summarize(matrix, reference=reference.get("class_il"),
                                            test_sizes=sizes)
            task_summary = metrics_lib.summarize(task_il, reference=reference.get("task_il"),
                                                 test_sizes=sizes)
        out = {"method": self.method.name,
               "method_config": dataclasses.asdict(self.method.config),
               "dataset": self.config.dataset.name,
               "scenario": self.scenario.kind, "joint": self.joint,
               "class_order": [int(c) for c in self.scenario.class_order],
               "num_tasks": len(self.scenario.tasks),
               "accuracy_matrix": matrix, "task_il_accuracy_matrix": task_il,
               "metrics": summary, "task_il_metrics": task_summary,
               "trainable_params": int(self.method.count_trainable(run.trainable, run.state)),
               # scalars the method keeps besides its trainable tree (prototypes, class
               # statistics, Gram matrices, earlier heads): what it stores instead of data
               "state_size": count_params(run.state),
               "seconds_per_task": run.seconds_per_task, "train_steps": run.global_step,
               "skipped_nonfinite_steps": run.skipped_steps,
               "backbone": {"name": self.backbone.config.name, "fingerprint": self.fingerprint},
               # what the steps ran on: results agree across layouts to float rounding
               "layout": dict(self.layout(), platform=jax.default_backend()),
               "config": self.config.to_dict()}
        if run.reference is not None:
            out["reference_accuracy"] = run.reference
        for key, rows in run.extra_rows.items():
            out[f"{key}_matrix"] = rows
        if run.confusion is not None:  # the last evaluation's, in original class ids
            order = self.scenario.class_order
            counts = np.asarray(run.confusion["matrix"])
            classes = [int(order[c]) for c in run.confusion["classes"]]
            totals = counts.sum(axis=1)
            out["final_confusion_matrix"] = {"classes": classes, "matrix": counts.tolist()}
            out["final_per_class_accuracy"] = {
                str(c): (100.0 * float(counts[i, i]) / totals[i] if totals[i] else None)
                for i, c in enumerate(classes)}
        return out

    # ======================================================================= helpers
    def training_tasks(self) -> List[scenarios.Task]:
        """The tasks trained on: the scenario's, or one task of all data for joint training
        (``scenario.joint``: the upper bound of any method)."""
        tasks = self.scenario.tasks
        if not self.joint:
            return tasks
        first = tasks[0]
        if any(t.train_source is not first.train_source for t in tasks):
            raise ValueError(
                f"scenario.joint=True needs every task to read one data source; this "
                f"{self.scenario.kind}-incremental scenario has a source per task (domains or "
                f"a dataset sequence), which joint training cannot merge yet; run the upper "
                f"bound on a class-incremental scenario or leave scenario.joint unset")
        return [dataclasses.replace(
            first, index=0, classes=tuple(c for t in tasks for c in t.classes),
            train_indices=np.concatenate([t.train_indices for t in tasks]),
            test_indices=np.concatenate([t.test_indices for t in tasks]))]

    def task_spec(self, t: int) -> TaskSpec:
        tasks = self.tasks
        return TaskSpec(index=t, num_classes=self.scenario.num_classes,
                        task_classes=tuple(tuple(int(c) for c in task.classes) for task in tasks))

    def task_data(self, task: scenarios.Task, queries: Optional[np.ndarray] = None) -> TaskData:
        """The task's training examples, un-augmented, for the methods' passes (with their
        cached frozen queries, if ``queries``)."""
        def batches():
            return (with_cached(local, {FROZEN_QUERY: queries})
                    for local in self._train_examples(task))

        def augmented_batches(epoch):  # no cached queries: the images differ from those
            purpose = "augmented_pass" + (f"/{epoch}" if epoch else "")
            return loader.read(pipeline.StreamBatches(
                [(task.train_source, task.train_indices)], self.label_map,
                batch_size=self.eval_batch_size, preprocess=self.train_preprocess,
                process_index=jax.process_index(), process_count=jax.process_count(),
                augment_seed=self.task_seed(task.index, purpose)),
                self.pass_read_options)
        # without augmentation the augmented view is the plain one, cached queries included
        augments = bool(self.train_preprocess.augments)
        return TaskData(batches, len(task.train_indices),
                        shard=lambda local: mesh_lib.shard_batch(local, self.mesh),
                        gather=self._gather, replicated=mesh_lib.replicated(self.mesh),
                        capacity=max(len(t.train_indices) for t in self.tasks),
                        compiled=self._task_data_compiled,
                        augmented_batches=(augmented_batches if augments
                                           else lambda epoch: batches()),
                        augments=augments)

    def task_seed(self, t: int, purpose: str = "") -> int:
        """The host-side seed of task ``t``'s data order and augmentation (``purpose`` names
        another stream of the same task)."""
        entropy = [self.config.seed, t] + ([zlib.crc32(purpose.encode())] if purpose else [])
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])

    def _train_examples(self, task: scenarios.Task):
        return self._fixed_batches([(task.train_source, task.train_indices)])

    def _fixed_batches(self, parts, read_inputs: bool = True):
        """This host's slice of un-augmented eval-size batches over ``(source, indices)``
        parts, in order (evaluation, the TaskData passes, the query cache); without
        ``read_inputs``, labels, masks and positions only."""
        return loader.read(pipeline.StreamBatches(
            parts, self.label_map, batch_size=self.eval_batch_size,
            preprocess=self.eval_preprocess, process_index=jax.process_index(),
            process_count=jax.process_count(), read_inputs=read_inputs),
            self.pass_read_options)

    # ================================================================= cached features
    def _plan_feature_cache(self, cache_cfg) -> Tuple[Optional[FeatureCache], frozenset]:
        """The run's feature cache and the kinds it holds (``'query'``, ``'fixed'``,
        ``'task'``; see
        :mod:`pecft_jax.train.feature_cache`), decided once for the run: a cache that filled
        up part-way would change the steps' inputs (with, then without the cached features)
        and compile them a second time. What does not fit ``max_bytes`` is left out from the
        start, the task features first, then the fixed features (both only save
        evaluations), with a warning."""
        if not cache_cfg.get("enabled", True):
            return None, frozenset()
        cache = FeatureCache(shard=lambda local: mesh_lib.shard_batch(local, self.mesh),
                             gather=self._gather, max_bytes=cache_cfg.get("max_bytes", 2 ** 31))
        tests = sum(task.num_test for task in self.scenario.tasks)
        floats = {}  # kind -> (rows, width)
        if self.method.uses_frozen_query:
            largest = max(len(task.train_indices) for task in self.tasks)
            floats["query"] = (tests + largest, self.backbone.feature_dim)
        if self.method.features_fixed_after is not None:
            floats["fixed"] = (tests, self.method.fixed_feature_dim)
        if self.method.task_features_fixed:
            floats["task"] = (tests * len(self.tasks), self.method.task_feature_dim)
        about = {"query": "the frozen queries of every test set and of the largest task's "
                          "training data",
                 "fixed": f"{self.method.name}'s fixed features of every test set",
                 "task": f"{self.method.name}'s features of every test set in every task's "
                         f"pass"}
        kinds = set(floats)
        for kind in ("task", "fixed", "query"):
            total = sum(rows * width for rows, width in (floats[k] for k in kinds))
            if kind not in kinds or cache.fits(total):
                continue
            rows, width = floats[kind]
            log.warning("feature_cache is off for this run for %s (%d examples x %d floats): "
                        "with the rest they would pass feature_cache.max_bytes=%d; raise it "
                        "to %d to cache them", about[kind], rows, width, cache.max_bytes,
                        total * 4)
            kinds.discard(kind)
        return (cache if kinds else None), frozenset(kinds)

    def training_queries(self, task: scenarios.Task, epochs: int) -> Optional[np.ndarray]:
        """The frozen queries of the task's training examples when caching them is exact
        (no augmentation) and pays (two epochs or more: each epoch would recompute them)."""
        if ("query" not in self.cached_kinds or self.train_preprocess.augment or epochs < 2
                or not self.feature_cache.fits(len(task.train_indices)
                                               * self.backbone.feature_dim)):
            return None
        return self.feature_cache.get(
            f"query/train/{task.index}", lambda inputs: self._query_features(self.frozen, inputs),
            lambda: self._train_examples(task))

    def test_queries(self, eval_tasks: List[scenarios.Task]) -> Optional[np.ndarray]:
        """The frozen queries of the test sets of ``eval_tasks`` in order, computed once per
        run for each task (None: the method does not use them, or they do not fit)."""
        if "query" not in self.cached_kinds:
            return None
        return self._cached_test_features(
            "query", eval_tasks, self.backbone.feature_dim,
            lambda inputs: self._query_features(self.frozen, inputs))

    def test_fixed_features(self, eval_tasks: List[scenarios.Task], t: int,
                            trainable) -> Optional[np.ndarray]:
        """The method's fixed features (``Method.features_fixed_after``) of the test sets of
        ``eval_tasks`` in order, for an evaluation after task ``t`` with ``trainable`` (on
        the devices): computed at the first evaluation after the features are fixed, then
        read (None: the method has none, they are not fixed yet, or they do not fit)."""
        after = self.method.features_fixed_after
        if "fixed" not in self.cached_kinds or t < after:
            return None
        return self._cached_test_features(
            "fixed", eval_tasks, self.method.fixed_feature_dim,
            lambda inputs: self._fixed_features(trainable, self.frozen, inputs))

    def test_task_features(self, eval_tasks: List[scenarios.Task], t: int, trainable,
                           state) -> Optional[PassRows]:
        """The features of the test sets of ``eval_tasks`` (in order) in the passes that
        ``logits`` reads after task ``t`` (``Method.task_features_fixed``,
        ``Method.scored_passes``), as rows ``(num_tasks, task_feature_dim)``, the other
        passes zero. Each (test set, pass) is computed once per run, with that task's spec,
        the first time it is needed -- a test set's missing passes in one read of its
        examples: after task ``t``, pass ``t`` of the earlier test sets and every pass of
        task ``t``'s (None: the method has none, no task is learnt yet, or they do not
        fit)."""
        if "task" not in self.cached_kinds or t < 0:
            return None
        cache, width = self.feature_cache, self.method.task_feature_dim
        passes = self.method.scored_passes(self.task_spec(min(t, len(self.tasks) - 1)))
        specs = [self.traced_task(self.task_spec(j)) for j in passes]

        def pass_of(spec):
            features = self.compiled_task_features(spec)
            return lambda inputs: features(trainable, state, self.frozen, inputs, spec)

        parts = []
        for task in eval_tasks:
            names = [f"task/{j}/test/{task.index}" for j in passes]
            missing = sum(not cache.has(name) for name in names)
            if not cache.fits(missing * task.num_test * width):
                return None
            arrays = cache.get_many(
                {name: pass_of(spec) for name, spec in zip(names, specs)},
                lambda task=task: self._fixed_batches([(task.test_source, task.test_indices)]))
            parts.append({j: arrays[name] for j, name in zip(passes, names)
                          if len(arrays[name])})
        return PassRows(parts, [task.num_test for task in eval_tasks], len(self.tasks), width)

    def _cached_test_features(self, kind: str, eval_tasks: List[scenarios.Task], width: int,
                              compute: Callable) -> Optional[np.ndarray]:
        parts = []
        for task in eval_tasks:
            name = f"{kind}/test/{task.index}"
            if not (self.feature_cache.has(name)
                    or self.feature_cache.fits(task.num_test * width)):
                return None
            parts.append(self.feature_cache.get(
                name, compute, lambda task=task: self._fixed_batches([(task.test_source,
                                                                       task.test_indices)])))
        return concatenate(parts)

    def _gather(self, tree: Any) -> Any:
        """Global (sharded or replicated) arrays -> numpy on this host, in mesh order."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return multihost_utils.process_allgather(tree, tiled=True)
        return mesh_lib.to_host(tree)

    def _preprocesses(self) -> Tuple[Any, Any]:
        """The training and the un-augmented preprocessing, handing the devices uint8
        pixels (normalised in ``Backbone.apply``, bit for bit as on the host) when both keep
        whole pixel values on every source of the run -- both, so that a program fed both
        kinds of batch (an augmented pass) compiles once -- else normalised float32."""
        train, plain = self._preprocess(augment=True), self._preprocess(augment=False)
        if isinstance(train, pipeline.Preprocess):
            shapes = {getattr(source, "image_shape", None) for task in self.scenario.tasks
                      for source in (task.train_source, task.test_source)}
            if all(p.whole_pixels(shape) for p in (train, plain) for shape in shapes):
                train, plain = (dataclasses.replace(p, pixels="uint8") for p in (train, plain))
        return train, plain

    def _preprocess(self, augment: bool) -> Any:
        """How the pipeline turns examples into the backbone's inputs: the image
        ``Preprocess`` (resize, normalise, augment), or tokenisation for a text backbone."""
        aug = self.config.get("augment", ml_collections.ConfigDict())
        if self.backbone.modality == "text":
            if augment and aug.get("enabled", False):
                raise ValueError("augment.enabled=True with a text backbone: there is no text "
                                 "augmentation; set augment.enabled=False")
            return TextPreprocess(self.backbone.tokenizer)
        return pipeline.Preprocess(
            image_size=self.backbone.image_size, channels=self.backbone.channels,
            mean=tuple(self.backbone.mean), std=tuple(self.backbone.std),
            augment=augment and aug.get("enabled", False),
            crop_padding=aug.get("crop_padding", 0), flip=aug.get("flip", False),
            random_resized_crop=aug.get("random_resized_crop", False),
            crop_scale=tuple(aug.get("crop_scale", (0.08, 1.0))),
            crop_ratio=tuple(aug.get("crop_ratio", (3 / 4, 4 / 3))),
            crop_sampler=aug.get("crop_sampler", "torchvision"),
            brightness=float(aug.get("brightness", 0.0)),
            resize_short=self.config.eval.get("resize_short", None),
            squash=self.config.eval.get("squash", False),
            resample=self.config.dataset.get("resample", "bilinear"),
            crop_resample=aug.get("crop_resample", None))

    def _count_trace(self, name: str, task: TaskSpec) -> None:
        """Counts a tracing of a jitted step (per task for a ``static_task`` method)."""
        if not task.is_traced:
            name = f"{name}/{task.index}"
        self.trace_counts[name] = self.trace_counts.get(name, 0) + 1

    def _check_health(self, run: RunState, t: int, health: Any) -> None:
        """Reads the steps' :func:`guard_nonfinite` record: under ``on_nonfinite='stop'`` a
        non-finite step stops the run (before anything of it is checkpointed); under
        ``'skip_step'`` the count of skipped steps goes to the run's results."""
        first, skipped = (int(v) for v in jax.device_get(health))
        run.skipped_steps = skipped
        if first >= 0:
            raise NonFiniteError(
                f"non-finite loss or parameters at task {t} (0-based), step {first} of the "
                f"task; the run stops and nothing after the last checkpoint is saved (resume "
                f"restarts from it). Lower train.learning_rate, set train.grad_clip_norm, or "
                f"set train.on_nonfinite='skip_step' to skip such steps.")

    def _meta(self, run: RunState, task: int, step_in_task: int, task_done: bool) -> dict:
        return {"task": task, "step_in_task": step_in_task, "task_done": task_done,
                "global_step": run.global_step, "accuracy_matrix": run.accuracy_matrix,
                "task_il_accuracy_matrix": run.task_il_matrix, "extra_rows": run.extra_rows,
                "seconds_per_task": run.seconds_per_task,
                "seconds_in_task": 0.0 if task_done else time.time() - run.task_started,
                "skipped_nonfinite_steps": run.skipped_steps,
                "train_steps": run.global_step, "fingerprint": self.fingerprint,
                "confusion": run.confusion, "reference_accuracy": run.reference,
                "config_hash": self.config_hash, "method": self.method.name,
                "layout": self.layout()}

    def layout(self) -> dict:
        """The devices and processes the run's arrays are split over."""
        return {"devices": int(self.mesh.size), "processes": int(jax.process_count())}

    def check_layout(self, meta: dict) -> None:
        """A run continues exactly only on the layout that wrote its checkpoint: data
        parallelism sums a batch's gradient per device, then across devices and processes,
        in another order on another layout (README: results agree to float rounding)."""
        saved, ours = meta.get("layout"), self.layout()
        if saved is not None and saved != ours:
            raise CheckpointMismatch(
                f"the checkpoints in {self.checkpointer.directory} were written by a run on "
                f"{saved['devices']} devices in {saved['processes']} process(es); this one has "
                f"{ours['devices']} in {ours['processes']}: resumed, it would continue to float "
                f"rounding, not as the original. Resume with --config.num_devices="
                f"{saved['devices'] // saved['processes']} on each of {saved['processes']} "
                f"process(es) (on a CPU host with fewer devices: --config.host_devices="
                f"{saved['devices'] // saved['processes']}), or start a fresh --workdir")

    def check_meta(self, meta: dict) -> None:
        if meta["fingerprint"] != self.fingerprint:
            raise CheckpointMismatch(
                f"the checkpoints in {self.checkpointer.directory} were trained on a different "
                f"backbone (fingerprint {meta['fingerprint']}, this run's is "
                f"{self.fingerprint}); use a fresh --workdir or the original backbone")
        if meta["config_hash"] != self.config_hash:
            raise CheckpointMismatch(
                f"the checkpoints in {self.checkpointer.directory} were written with a different "
                f"config (hash {meta['config_hash']}, this run's is {self.config_hash}); resume "
                f"with the original config or use a fresh --workdir")
        if meta["method"] != self.method.name:
            raise CheckpointMismatch(f"checkpoint is from method {meta['method']!r}, not "
                                     f"{self.method.name!r}")

    def close(self, failed: bool = False) -> None:
        self.checkpointer.close()
        self.writer.close(failed)


# =========================================================================== pieces
class Preempted(Exception):
    """The run stopped on SIGTERM / SIGINT after writing a checkpoint to resume from."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = int(signum)


class NonFiniteError(FloatingPointError):
    """A training step or a method's after-task work produced NaN or infinite values."""


def _all_finite(tree: Any) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def guard_nonfinite(new: tuple, old: tuple, step: Array, health: Array, skip: bool) -> tuple:
    """The train step's guard against divergence, on the device (no host sync per step).

    ``new`` = ``(trainable, state, opt_state, metrics)`` after the update, ``old`` the
    inputs; the step is healthy when its loss and every new parameter are finite.
    ``health`` = ``[first unhealthy step or -1, steps skipped so far]``. With ``skip`` an
    unhealthy step keeps ``old`` (and counts as skipped); without, it is recorded and the
    loop stops the run at its next check (:meth:`ContinualTrainer._check_health`).
    """
    trainable, state, opt_state, metrics = new
    healthy = _all_finite(trainable) & _all_finite(metrics.get("loss", 0.0))
    first = jnp.where((health[0] < 0) & ~healthy & (not skip), step, health[0])
    skipped = health[1] + (~healthy).astype(jnp.int32) if skip else health[1]
    if skip:
        trainable, state, opt_state = jax.tree_util.tree_map(
            lambda n, o: jnp.where(healthy, n, o), (trainable, state, opt_state), old)
    return trainable, state, opt_state, metrics, jnp.stack([first, skipped]).astype(jnp.int32)


def nonfinite_leaves(tree: Any) -> List[str]:
    """Paths of the floating-point leaves (host or device) holding NaN or inf."""
    return [jax.tree_util.keystr(path) for path, leaf in
            jax.tree_util.tree_flatten_with_path(tree)[0]
            if np.issubdtype(np.asarray(leaf).dtype, np.inexact)
            and not np.all(np.isfinite(np.asarray(leaf)))]


# the cosines stepped once per epoch (their lengths: epochs and steps per epoch)
EPOCH_COSINES = ("cosine_epochs", "coda_cosine", "timm_cosine")


def schedule_lengths(train_cfg: ml_collections.ConfigDict, total_steps: int,
                     steps_per_epoch: int = 1) -> tuple:
    """The task lengths ``train.schedule`` is built from: none for ``'constant'``, the
    task's steps for ``'cosine'``, its epochs and steps per epoch for the epoch cosines, its
    steps per epoch for ``'multistep_epochs'``. The base optimizer keeps them in its state
    (:func:`make_base_optimizer`), so tasks of any length share one compiled train step;
    what bakes them in (the optimizer's init, the logged rate) is keyed by them."""
    name = train_cfg.get("schedule", "constant")
    if name == "constant":
        return ()
    if name == "cosine":
        return (int(total_steps),)
    if name in EPOCH_COSINES:
        per_epoch = max(1, int(steps_per_epoch))
        return (max(1, int(total_steps) // per_epoch), per_epoch)
    if name == "multistep_epochs":
        return (max(1, int(steps_per_epoch)),)
    raise ValueError(f"unknown schedule {name!r}; use one of {SCHEDULES}")


def make_schedule(train_cfg: ml_collections.ConfigDict, total_steps: int,
                  steps_per_epoch: int = 1):
    """``train.learning_rate`` on ``train.schedule`` (see :func:`make_base_optimizer`): a
    number or an optax schedule of the step."""
    return schedule_of_lengths(train_cfg,
                               schedule_lengths(train_cfg, total_steps, steps_per_epoch))


def schedule_of_lengths(train_cfg: ml_collections.ConfigDict, lengths: tuple):
    """:func:`make_schedule` from the task's :func:`schedule_lengths`, given as Python ints or
    as int32 arrays traced in a compiled step (the optimizer state's)."""
    lr = train_cfg.learning_rate
    schedule_name = train_cfg.get("schedule", "constant")
    warmup = int(train_cfg.get("warmup_steps", 0))
    if warmup and schedule_name in EPOCH_COSINES + ("multistep_epochs",):
        raise ValueError(f"train.schedule={schedule_name!r} has no warm-up; set "
                         f"train.warmup_steps=0 (or use 'cosine', which has one)")
    if schedule_name == "constant":
        schedule = (optax.linear_schedule(0.0, lr, warmup) if warmup else lr)
        if warmup:
            schedule = optax.join_schedules([schedule, optax.constant_schedule(lr)], [warmup])
    elif schedule_name == "cosine":
        (steps,) = lengths
        # (Python's max for Python ints: an eager jnp op would compile a program)
        decay = (max(steps, warmup + 1) if isinstance(steps, int)
                 else jnp.maximum(steps, warmup + 1))
        schedule = warmup_cosine_schedule(0.0 if warmup else lr, lr, warmup, decay)
    elif schedule_name == "cosine_epochs":
        schedule = cosine_epoch_schedule(lr, *lengths)
    elif schedule_name == "coda_cosine":
        schedule = coda_cosine_schedule(lr, *lengths)
    elif schedule_name == "timm_cosine":
        schedule = timm_cosine_schedule(lr, float(train_cfg.get("min_lr", 0.0)), *lengths)
    elif schedule_name == "multistep_epochs":
        schedule = multistep_epoch_schedule(lr, tuple(train_cfg.get("milestones", ())),
                                            float(train_cfg.get("lr_decay", 0.1)), *lengths)
    else:
        raise ValueError(f"unknown schedule {schedule_name!r}; use one of {SCHEDULES}")
    return schedule


def make_base_optimizer(train_cfg: ml_collections.ConfigDict, total_steps: int,
                        steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """``train.optimizer`` at ``train.learning_rate`` on ``train.schedule``:

    * ``'constant'`` (after an optional linear warm-up), ``'cosine'`` (per step, to 0 at the
      task's last step), ``'cosine_epochs'`` (PyTorch's ``CosineAnnealingLR(T_max=epochs)``
      stepped once per epoch, as most official PyTorch code runs it),
      ``'multistep_epochs'`` (PyTorch's ``MultiStepLR(milestones=train.milestones,
      gamma=train.lr_decay)`` stepped once per epoch: the rate is multiplied by ``lr_decay``
      at the start of each milestone epoch) or ``'coda_cosine'`` (the ``CosineSchedule`` of
      CODA-Prompt's code base, which InfLoRA's reuses, as it runs there: stepped per epoch,
      ``lr_e = lr cos(99 pi max(e - 1, 0) / (200 (E - 1)))`` -- its constructor's first
      step is undone, so epochs 0 and 1 both run at ``lr``) or ``'timm_cosine'`` (timm's
      per-epoch ``CosineLRScheduler`` to ``train.min_lr``, one epoch late as the
      DualPrompt-PyTorch lineage steps it: HiDe-Prompt's);
    * ``'adam'``, ``'adamw'`` (decoupled weight decay), ``'transformers_adamw'``
      (Hugging Face ``transformers.AdamW``: epsilon and weight decay where it puts them,
      :mod:`pecft_jax.train.optimizers`) or ``'sgd'`` (``momentum``);
      ``train.weight_decay`` on ``'adam'`` / ``'sgd'`` is PyTorch's coupled L2 term
      (``g + wd * p`` before the update), what ``torch.optim.SGD/Adam(weight_decay=)`` do;

    ``train.grad_clip_norm`` is not part of it: the loop clips the gradients of every
    parameter group under one global norm before the groups' optimizers
    (``partition.make_optimizer``'s ``clip_norm``).
    """
    lengths = schedule_lengths(train_cfg, total_steps, steps_per_epoch)
    if not lengths:
        return _base_optimizer(train_cfg, schedule_of_lengths(train_cfg, ()))
    return partition.with_lengths(
        lambda *traced: _base_optimizer(train_cfg, schedule_of_lengths(train_cfg, traced)),
        lengths)


def _base_optimizer(train_cfg: ml_collections.ConfigDict,
                    schedule: Any) -> optax.GradientTransformation:
    name = train_cfg.get("optimizer", "adam")
    weight_decay = float(train_cfg.get("weight_decay", 0.0) or 0.0)
    # Adam's moments and epsilon: unless set, each class's default (PyTorch's and optax's
    # 1e-8, transformers.AdamW's 1e-6)
    adam = dict(b1=train_cfg.get("b1", 0.9), b2=train_cfg.get("b2", 0.999),
                eps=train_cfg.get("eps", 1e-6 if name == "transformers_adamw" else 1e-8))
    if name == "adam":
        opt = optax.adam(schedule, **adam)
    elif name == "adamw":
        opt = optax.adamw(schedule, weight_decay=weight_decay, **adam)
    elif name == "transformers_adamw":
        opt = optimizers.transformers_adamw(schedule, weight_decay=weight_decay, **adam)
    elif name == "sgd":
        opt = optax.sgd(schedule, momentum=train_cfg.get("momentum", None) or None)
    else:
        raise ValueError(f"unknown optimizer {name!r}; use one of {OPTIMIZERS}")
    if weight_decay and name not in ("adamw", "transformers_adamw"):
        opt = optax.chain(optax.add_decayed_weights(weight_decay), opt)
    return opt


def learning_rate_at(schedule, step: int) -> float:
    """The rate ``schedule`` (a number or an optax schedule) gives the update of ``step``
    (0-based: optax counts the updates it has made)."""
    return float(schedule(step)) if callable(schedule) else float(schedule)


def config_hash(config: ml_collections.ConfigDict) -> str:
    flat = {k: v for k, v in flatten_config(config.to_dict(), keep_empty=False).items()
            if not is_execution_key(k)
            and not (k in HASHED_ONLY_WHEN_SET and v == HASHED_ONLY_WHEN_SET[k])}
    blob = json.dumps(flat, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
