"""The one continual driver every method runs on.

for each task t:
    method.before_task -> jit-compiled, data-parallel train steps -> method.after_task
    -> evaluation on tasks 0..t (one row of the class-IL and task-IL accuracy matrices)
    -> checkpoint (plus checkpoints every N steps inside the task)

Every random number derives from ``config.seed`` by folding in the task and the step, and
the data order from (seed, task, epoch); so a run resumed from a checkpoint computes exactly
what the uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Dict, List

import jax
import ml_collections
import numpy as np
import optax

from pecft_jax import metrics as metrics_lib
from pecft_jax.backbones.backbone import load_backbone
from pecft_jax.backbones.pretrained import fingerprint
from pecft_jax.data import pipeline, scenarios
from pecft_jax.methods import Method, TaskData, TaskSpec, create_method
from pecft_jax.train import mesh as mesh_lib
from pecft_jax.train.checkpoint import Checkpointer, CheckpointMismatch
from pecft_jax.train.logging_utils import MetricWriter, progress

log = logging.getLogger("pecft_jax")

# Config keys that may change between a run and its resumption.
_RESUMABLE_KEYS = ("train.checkpoint_every_steps", "train.log_every_steps", "train.prefetch",
                   "progress_bar",
                   "eval.batch_size", "num_devices", "distributed")


def config_hash(config: ml_collections.ConfigDict) -> str:
    flat = _flatten_config(config.to_dict())
    for key in _RESUMABLE_KEYS:
        flat.pop(key, None)
    blob = json.dumps(flat, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _flatten_config(tree: Dict, prefix: str = "") -> Dict:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(_flatten_config(value, path))
        else:
            out[path] = value
    return out


def make_base_optimizer(train_cfg: ml_collections.ConfigDict,
                        total_steps: int) -> optax.GradientTransformation:
    lr = train_cfg.learning_rate
    schedule_name = train_cfg.get("schedule", "constant")
    warmup = int(train_cfg.get("warmup_steps", 0))
    if schedule_name == "constant":
        schedule = (optax.linear_schedule(0.0, lr, warmup) if warmup else lr)
        if warmup:
            schedule = optax.join_schedules([schedule, optax.constant_schedule(lr)], [warmup])
    elif schedule_name == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup,
                                                      max(total_steps, warmup + 1))
    else:
        raise ValueError(f"unknown schedule {schedule_name!r}; use 'constant' or 'cosine'")
    name = train_cfg.get("optimizer", "adam")
    if name == "adam":
        opt = optax.adam(schedule, b1=train_cfg.get("b1", 0.9), b2=train_cfg.get("b2", 0.999))
    elif name == "adamw":
        opt = optax.adamw(schedule, weight_decay=train_cfg.get("weight_decay", 1e-4))
    elif name == "sgd":
        opt = optax.sgd(schedule, momentum=train_cfg.get("momentum", None) or None)
    else:
        raise ValueError(f"unknown optimizer {name!r}; use 'adam', 'adamw' or 'sgd'")
    clip = train_cfg.get("grad_clip_norm", None)
    return optax.chain(optax.clip_by_global_norm(clip), opt) if clip else opt


def count_params(tree: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


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


class ContinualTrainer:
    """Holds the run's static pieces (mesh, backbone, scenario, method) and runs tasks."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 write_metrics: bool = True):
        self.config = config
        self.workdir = workdir
        if config.get("distributed", False):
            mesh_lib.initialise_distributed()
        self.mesh = mesh_lib.make_mesh(config.get("num_devices", None))
        self.batch_size = config.train.batch_size
        mesh_lib.check_batch_size(self.batch_size, self.mesh)
        self.eval_batch_size = config.get("eval", {}).get("batch_size", self.batch_size)
        mesh_lib.check_batch_size(self.eval_batch_size, self.mesh)
        bcfg = config.backbone
        self.backbone, frozen = load_backbone(
            bcfg.checkpoint, image_size=bcfg.get("image_size", None),
            mean=tuple(bcfg.get("mean", (0.5,))), std=tuple(bcfg.get("std", (0.5,))),
            seed=config.seed)
        self.fingerprint = fingerprint(frozen)
        self.frozen = mesh_lib.replicate(frozen, self.mesh)
        self.scenario = scenarios.build_scenario(config)
        self.label_map = self.scenario.label_map()
        self.method: Method = create_method(config.method.name, config.method, self.backbone,
                                            self.scenario.num_classes, len(self.scenario.tasks))
        self.train_preprocess = self._preprocess(augment=True)
        self.eval_preprocess = self._preprocess(augment=False)
        self.trace_counts: Dict[str, int] = {}
        self.config_hash = config_hash(config)
        self.writer = MetricWriter(workdir, enabled=write_metrics and jax.process_index() == 0)
        self.checkpointer = Checkpointer(workdir)

    # ------------------------------------------------------------------ setup
    def _preprocess(self, augment: bool) -> pipeline.Preprocess:
        aug = self.config.get("augment", ml_collections.ConfigDict())
        return pipeline.Preprocess(
            image_size=self.backbone.image_size, channels=self.backbone.channels,
            mean=tuple(self.backbone.mean), std=tuple(self.backbone.std),
            augment=augment and aug.get("enabled", False),
            crop_padding=aug.get("crop_padding", 0), flip=aug.get("flip", False))

    def training_tasks(self) -> List[scenarios.Task]:
        """The tasks trained on: the scenario's, or one task of all data for joint training."""
        tasks = self.scenario.tasks
        if not self.method.joint:
            return tasks
        first = tasks[0]
        return [dataclasses.replace(
            first, index=0, classes=tuple(c for t in tasks for c in t.classes),
            train_indices=np.concatenate([t.train_indices for t in tasks]),
            test_indices=np.concatenate([t.test_indices for t in tasks]))]

    def task_spec(self, t: int) -> TaskSpec:
        tasks = self.training_tasks()
        return TaskSpec(index=t, classes=tuple(tasks[t].classes),
                        seen_classes=tuple(c for task in tasks[:t + 1] for c in task.classes),
                        num_classes=self.scenario.num_classes, num_tasks=len(tasks),
                        task_classes=tuple(tuple(task.classes) for task in tasks))

    def _count_trace(self, name: str) -> None:
        self.trace_counts[name] = self.trace_counts.get(name, 0) + 1

    # ------------------------------------------------------------ jit'd steps
    def make_train_step(self, task: TaskSpec, optimizer: optax.GradientTransformation):
        method = self.method

        def train_step(trainable, state, opt_state, frozen, batch, rng):
            self._count_trace(f"train_step/{task.index}")

            def loss_fn(params):
                return method.loss(params, state, frozen, batch, rng, task)

            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
            updates, opt_state = optimizer.update(grads, opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
            new_state = aux.get("state")
            metrics = dict(aux.get("metrics", {}), loss=loss)
            return trainable, (state if new_state is None else new_state), opt_state, metrics

        replicated = mesh_lib.replicated(self.mesh)
        return jax.jit(train_step, donate_argnums=(0, 1, 2),
                       out_shardings=(replicated, replicated, replicated, replicated))

    def make_eval_step(self, task: TaskSpec):
        method = self.method

        def eval_step(trainable, state, frozen, images):
            self._count_trace(f"eval_step/{task.index}")
            out = method.logits(trainable, state, frozen, images, task)
            return out if isinstance(out, dict) else {"logits": out}

        return jax.jit(eval_step)

    def _gather(self, tree: Any) -> Any:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return multihost_utils.process_allgather(tree, tiled=True)
        return mesh_lib.to_host(tree)

    def _run_sharded(self, compiled: Callable, batch: dict, *args) -> Any:
        sharded = mesh_lib.shard_batch({"image": batch["image"]}, self.mesh)
        return self._gather(compiled(*args, sharded["image"]))

    # ------------------------------------------------------------- evaluation
    def evaluate(self, run: RunState, t: int) -> Dict[str, List[float]]:
        """Accuracy (%) on the test data of tasks 0..t (all tasks for joint training)."""
        spec = self.task_spec(min(t, len(self.training_tasks()) - 1))
        eval_step = self.make_eval_step(spec)
        eval_tasks = self.scenario.tasks if self.method.joint else self.scenario.tasks[:t + 1]
        seen = sorted({c for task in eval_tasks for c in task.classes})
        row: Dict[str, List[float]] = {"class_il": [], "task_il": []}
        for task in eval_tasks:
            logits, labels, extras = [], [], {}
            for batch in pipeline.eval_batches(
                    task.test_source, task.test_indices, self.label_map,
                    batch_size=self.eval_batch_size, preprocess=self.eval_preprocess,
                    process_index=jax.process_index(), process_count=jax.process_count()):
                out = self._run_sharded(eval_step, batch, run.trainable, run.state, self.frozen)
                keep = self._gather_mask(batch["mask"])
                logits.append(out["logits"][keep])
                labels.append(self._gather_labels(batch["label"])[keep])
                for key, value in out.items():
                    if key != "logits":
                        extras.setdefault(key, []).append(value[keep])
            logits_np, labels_np = np.concatenate(logits), np.concatenate(labels)
            row["class_il"].append(metrics_lib.class_incremental_accuracy(
                logits_np, labels_np, seen))
            row["task_il"].append(metrics_lib.task_incremental_accuracy(
                logits_np, labels_np, task.classes))
            if "task_pred" in extras:  # task-identity prediction accuracy (prompt selection)
                pred = np.concatenate(extras["task_pred"])
                row.setdefault("task_identity", []).append(100.0 * float(np.mean(pred == task.index)))
        return row

    def _gather_mask(self, mask: np.ndarray) -> np.ndarray:
        return self._gather_labels(mask).astype(bool)

    def _gather_labels(self, local: np.ndarray) -> np.ndarray:
        """This host's slice of per-example host data -> the global batch's, in mesh order."""
        return np.asarray(self._gather(local))

    def task_data(self, task: scenarios.Task) -> TaskData:
        def iterate():
            for batch in pipeline.eval_batches(
                    task.train_source, task.train_indices, self.label_map,
                    batch_size=self.eval_batch_size, preprocess=self.eval_preprocess,
                    process_index=jax.process_index(), process_count=jax.process_count()):
                yield ({"image": batch["image"], "label": self._gather_labels(batch["label"])},
                       self._gather_mask(batch["mask"]))
        return TaskData(iterate, self._run_sharded)

    # ------------------------------------------------------------------ train
    def _meta(self, run: RunState, task: int, step_in_task: int, task_done: bool) -> dict:
        return {"task": task, "step_in_task": step_in_task, "task_done": task_done,
                "global_step": run.global_step, "accuracy_matrix": run.accuracy_matrix,
                "task_il_accuracy_matrix": run.task_il_matrix, "extra_rows": run.extra_rows,
                "seconds_per_task": run.seconds_per_task, "fingerprint": self.fingerprint,
                "config_hash": self.config_hash, "method": self.method.name}

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

    def _optimizer(self, spec: TaskSpec, trainable: dict, steps: int):
        base = make_base_optimizer(self.config.train, steps)
        labels = self.method.param_labels(trainable, spec)
        groups = dict(self.method.optimizer_groups(spec, base))
        used = set(jax.tree_util.tree_leaves(labels))
        unknown = used - set(groups)
        if unknown:
            raise ValueError(f"method {self.method.name} labels parameters {sorted(unknown)} but "
                             f"defines optimizer groups {sorted(groups)}")
        return optax.multi_transform({k: v for k, v in groups.items() if k in used}, labels)

    def run(self) -> dict:
        base_rng = jax.random.key(self.config.seed)
        tasks = self.training_tasks()
        resume = self.checkpointer.latest()
        start_task, start_step, opt_state = 0, 0, None
        if resume is None:
            trainable, state = self.method.init(jax.random.fold_in(base_rng, 10 ** 6), self.frozen)
            run = RunState(trainable, state, [], [], {}, [])
        else:
            kind, ckpt_step, meta = resume
            self.check_meta(meta)
            restored = None
            if kind == "tasks":
                restored = self.checkpointer.restore(kind, ckpt_step)
                start_task = meta["task"] + 1
            run = RunState(None, None, meta["accuracy_matrix"], meta["task_il_accuracy_matrix"],
                           meta.get("extra_rows", {}), meta["seconds_per_task"],
                           meta["global_step"])
            if kind == "latest":
                start_task, start_step = meta["task"], meta["step_in_task"]
                # The optimizer's structure depends on the restored trainable tree: read the
                # trees first, then the optimizer state against a freshly initialised one.
                trees = self.checkpointer.restore(kind, ckpt_step)
                optimizer = self._optimizer(self.task_spec(start_task), trees["trainable"],
                                            self._steps_in_task(tasks[start_task]))
                restored = self.checkpointer.restore(
                    kind, ckpt_step, opt_state_target=optimizer.init(trees["trainable"]))
                opt_state = restored["opt_state"]
            run.trainable, run.state = restored["trainable"], restored["state"]
            log.info("resuming from checkpoint %s/%d (task %d, step %d)", kind, ckpt_step,
                     start_task, start_step)
        if jax.process_index() == 0:  # after the resume checks: `evaluate` rebuilds from it
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(self.config.to_json(indent=1))
        for t in range(start_task, len(tasks)):
            self._train_task(run, tasks[t], t, base_rng, start_step if t == start_task else 0,
                             opt_state if t == start_task else None)
        return self.results(run)

    def _steps_in_task(self, task: scenarios.Task) -> int:
        per_epoch = pipeline.steps_per_epoch(len(task.train_indices), self.batch_size)
        if per_epoch == 0:
            raise ValueError(f"task {task.index} has {len(task.train_indices)} training examples, "
                             f"fewer than one batch of {self.batch_size}; lower train.batch_size")
        return per_epoch * self.config.train.epochs

    def _train_task(self, run: RunState, task: scenarios.Task, t: int, base_rng,
                    start_step: int, opt_state) -> None:
        spec = self.task_spec(t)
        task_rng = jax.random.fold_in(base_rng, t)
        started = time.time()
        if opt_state is None:  # not resuming inside this task
            run.trainable, run.state = self.method.before_task(
                spec, run.trainable, run.state, self.frozen, jax.random.fold_in(task_rng, 0))
        steps = self._steps_in_task(task)
        per_epoch = steps // self.config.train.epochs
        optimizer = self._optimizer(spec, run.trainable, steps)
        trainable = mesh_lib.replicate(run.trainable, self.mesh)
        state = mesh_lib.replicate(run.state, self.mesh)
        opt_state = mesh_lib.replicate(optimizer.init(trainable) if opt_state is None
                                       else opt_state, self.mesh)
        train_step = self.make_train_step(spec, optimizer)
        every = int(self.config.train.get("checkpoint_every_steps", 0) or 0)
        log_every = int(self.config.train.get("log_every_steps", 20) or 20)
        train_rng = jax.random.fold_in(task_rng, 1)
        bar = progress(total=steps, initial=start_step, desc=f"task {t + 1}/{len(self.training_tasks())}",
                       enabled=self.config.get("progress_bar", True) and jax.process_index() == 0)
        step, tick, images_seen = start_step, time.time(), 0
        data_seed = int(np.random.SeedSequence([self.config.seed, t]).generate_state(1)[0])
        while step < steps:
            epoch, offset = divmod(step, per_epoch)
            batches = pipeline.train_batches(
                task.train_source, task.train_indices, self.label_map,
                batch_size=self.batch_size, seed=data_seed, epoch=epoch,
                preprocess=self.train_preprocess, start_step=offset,
                process_index=jax.process_index(), process_count=jax.process_count())
            # host-side reading/augmentation overlaps the device steps
            for local in pipeline.prefetch(batches, int(self.config.train.get("prefetch", 2))):
                batch = mesh_lib.shard_batch(local, self.mesh)
                trainable, state, opt_state, metrics = train_step(
                    trainable, state, opt_state, self.frozen, batch,
                    jax.random.fold_in(train_rng, step))
                step += 1
                run.global_step += 1
                images_seen += self.batch_size
                if step % log_every == 0 or step == steps:
                    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    host["images_per_sec"] = images_seen / max(time.time() - tick, 1e-9)
                    tick, images_seen = time.time(), 0
                    self.writer.write(run.global_step, {f"train/{k}": v for k, v in host.items()},
                                      task=t)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in host.items()})
                bar.update(1)
                if every and step % every == 0 and step < steps:
                    self.checkpointer.save(task_end=False, step=run.global_step,
                                           trainable=trainable, state=state,
                                           opt_state=opt_state, rng=base_rng,
                                           meta=self._meta(run, t, step, False))
                if step >= steps:
                    break
        bar.close()
        run.trainable, run.state = mesh_lib.to_host(trainable), mesh_lib.to_host(state)
        run.state = self.method.after_task(spec, run.trainable, run.state, self.frozen,
                                           self.task_data(task), jax.random.fold_in(task_rng, 2))
        run.seconds_per_task.append(time.time() - started)
        row = self.evaluate(run, t)
        run.accuracy_matrix.append(row["class_il"])
        run.task_il_matrix.append(row["task_il"])
        for key, values in row.items():
            if key not in ("class_il", "task_il"):
                run.extra_rows.setdefault(key, []).append(values)
        self.writer.write(run.global_step, {f"eval/class_il_task{j}": v
                                            for j, v in enumerate(row["class_il"])}, task=t)
        log.info("task %d: class-IL %s", t, " ".join(f"{v:.1f}" for v in row["class_il"]))
        self.checkpointer.save(task_end=True, step=t, trainable=run.trainable, state=run.state,
                               opt_state=None, rng=base_rng, meta=self._meta(run, t, steps, True))

    # --------------------------------------------------------------- results
    def results(self, run: RunState) -> dict:
        matrix, task_il = run.accuracy_matrix, run.task_il_matrix
        if self.method.joint:  # one row over all tasks: only the final accuracy is defined
            summary = {"average_accuracy": float(np.mean(matrix[-1])),
                       "average_incremental_accuracy": None, "forgetting": None, "bwt": None}
            task_summary = {"average_accuracy": float(np.mean(task_il[-1]))}
        else:
            summary = metrics_lib.summarize(matrix)
            task_summary = metrics_lib.summarize(task_il)
        out = {"method": self.method.name, "dataset": self.config.dataset.name,
               "scenario": self.scenario.kind, "num_tasks": len(self.scenario.tasks),
               "accuracy_matrix": matrix, "task_il_accuracy_matrix": task_il,
               "metrics": summary, "task_il_metrics": task_summary,
               "trainable_params": count_params(
                   self.method.count_trainable(run.trainable)
                   if hasattr(self.method, "count_trainable") else run.trainable),
               "seconds_per_task": run.seconds_per_task,
               "backbone": {"name": self.backbone.config.name, "fingerprint": self.fingerprint},
               "config": self.config.to_dict()}
        for key, rows in run.extra_rows.items():
            out[f"{key}_matrix"] = rows
        return out

    def close(self) -> None:
        self.checkpointer.close()
        self.writer.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) the experiment in ``workdir`` and writes ``results.json``."""
    os.makedirs(workdir, exist_ok=True)
    trainer = ContinualTrainer(config, workdir)
    try:
        results = trainer.run()
        results["compilations"] = dict(trainer.trace_counts)
    finally:
        trainer.close()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=_json_default)
    return results


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
