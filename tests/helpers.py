"""Shared test configurations."""
import os
import pytest

from pecft_jax.configs import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(method="l2p", **method_options):
    c = base_config()
    c.progress_bar = False
    c.compilation_cache_dir = ""  # compile counts in tests must not depend on earlier runs
    c.backbone.checkpoint = "random:ViT-Micro/4"
    c.dataset.name = "digits"
    c.scenario.num_tasks = 5
    c.scenario.class_order = "seed"
    c.scenario.seed = 3
    c.train.epochs = 1
    c.train.batch_size = 32
    c.train.learning_rate = 0.01
    c.train.checkpoint_every_steps = 3
    c.eval.batch_size = 64
    c.method.name = method
    if method == "l2p":
        c.method.pool_size = 6
        c.method.prompt_length = 2
        c.method.top_k = 2
    for key, value in method_options.items():
        c.method[key] = value
    return c


def task_spec(index, task_classes, num_classes=None):
    """The TaskSpec the loop would build for task ``index`` of ``task_classes``."""
    from pecft_jax.methods import TaskSpec
    task_classes = tuple(tuple(c) for c in task_classes)
    return TaskSpec(index=index,
                    num_classes=num_classes or len({c for cs in task_classes for c in cs}),
                    task_classes=task_classes)


def load_experiment_config(name, arg):
    """``experiments/configs/<name>.py``'s ``get_config(arg)``, loaded as the CLI does."""
    from pecft_jax.configs import load_config_file
    return load_config_file(os.path.join(ROOT, "experiments", "configs", f"{name}.py"), arg)


def array_task_data(images, labels, batch=8, num_devices=None, augmented=None):
    """A real TaskData over arrays, sharded over a mesh of ``num_devices`` (all by default)
    like the loop's: fixed-size batches, the last one padded, with mask and index; its
    ``augmented(epoch)`` view holds ``augmented`` (the same images by default, as a run
    without augmentation), or ``augmented(epoch)`` if it is a function."""
    import numpy as np
    from pecft_jax.methods import TaskData
    from pecft_jax.train import mesh as mesh_lib
    mesh = mesh_lib.make_mesh(num_devices)
    images, labels = np.asarray(images), np.asarray(labels)

    def batches(pixels=images):
        for start in range(0, len(pixels), batch):
            order = np.arange(start, start + batch)
            mask = (order < len(pixels)).astype(np.float32)
            rows = np.where(mask > 0, order, start)
            yield {"inputs": pixels[rows], "label": labels[rows].astype(np.int32), "mask": mask,
                   "index": order.astype(np.int32)}

    of_epoch = augmented if callable(augmented) else (
        lambda epoch: images if augmented is None else np.asarray(augmented))
    return TaskData(batches, len(images), shard=lambda b: mesh_lib.shard_batch(b, mesh),
                    gather=mesh_lib.to_host, replicated=mesh_lib.replicated(mesh),
                    augmented_batches=lambda epoch: batches(np.asarray(of_epoch(epoch))),
                    augments=augmented is not None)


def first_gradient_step(config, workdir):
    """The loop's pieces for task 0's first training batch, without training: a namespace
    of ``method``, ``frozen``, ``spec``, ``trainable``, ``state`` (initialised with key 0),
    the task's ``optimizer`` (one epoch), its ``learning`` leaves, the batch's ``grads`` and
    ``aux`` (key 1) and the optimizer's first ``updates`` from a fresh state."""
    import types
    import jax
    import jax.numpy as jnp
    from pecft_jax.train.loop import ContinualTrainer
    trainer = ContinualTrainer(config, str(workdir))
    try:
        spec = trainer.task_spec(0)
        trainable, state = trainer.method.init(jax.random.key(0), trainer.frozen)
        optimizer = trainer.optimizer(spec, trainable, trainer.tasks[0], 1)
        learning, _ = optimizer.split(trainable)
        batch = next(iter(trainer.task_data(trainer.tasks[0])._batches()))
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        grads, aux = trainer.method.gradients(trainable, state, trainer.frozen, batch,
                                              jax.random.key(1), spec, optimizer)
        updates, _ = optimizer.transform.update(grads, optimizer.init(trainable), learning)
    finally:
        trainer.close()
    return types.SimpleNamespace(method=trainer.method, frozen=trainer.frozen, spec=spec,
                                 trainable=trainable, state=state, optimizer=optimizer,
                                 learning=learning, grads=grads, aux=aux, updates=updates)


def class_dependent_tasks(tasks, per_class, seed=0):
    """Per task ``(images (N, 16, 16, 1) float32, labels (N,))`` for ViT-Micro/4: noise
    shifted by the class id, so that a classifier has something to learn."""
    import numpy as np
    rng = np.random.default_rng(seed)
    data = []
    for classes in tasks:
        labels = np.repeat(classes, per_class)
        images = (rng.normal(size=(len(labels), 16, 16, 1))
                  + 0.7 * labels[:, None, None, None] / 5.0).astype(np.float32)
        data.append((images, labels))
    return data


def assert_same_task_checkpoint(workdir_a, workdir_b, task):
    """The task-end checkpoints of ``task`` in two workdirs hold bit-identical trainable and
    state trees (e.g. a resumed run against its uninterrupted twin)."""
    import jax
    import numpy as np
    from pecft_jax.train.checkpoint import Checkpointer
    ckpts = [Checkpointer(str(w)) for w in (workdir_a, workdir_b)]
    try:
        a, b = (c.restore("tasks", task) for c in ckpts)
    finally:
        for c in ckpts:
            c.close()
    for key in ("trainable", "state"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, a[key], b[key])


def task_checkpoints(workdir, tasks, part=None):
    """The task-end checkpoints of ``tasks`` in ``workdir`` (their ``part``, e.g.
    ``'trainable'``, if given), read and closed."""
    from pecft_jax.train.checkpoint import Checkpointer
    ckpt = Checkpointer(str(workdir))
    try:
        restored = [ckpt.restore("tasks", t) for t in tasks]
    finally:
        ckpt.close()
    return [r[part] for r in restored] if part else restored


class Interrupted(Exception):
    """A simulated crash of a run."""


class _WatchedIterator:
    """The loop's training-batch iterator, each batch passed through ``on_batch(n, batch)``
    (``n`` counts the run's batches over tasks from 1), which returns the batch to use or
    raises."""

    def __init__(self, iterator, counter, on_batch):
        self.iterator, self.counter, self.on_batch = iterator, counter, on_batch

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.iterator)
        self.counter["n"] += 1
        return self.on_batch(self.counter["n"], batch)

    def get_state(self):
        return self.iterator.get_state()

    def close(self):
        from pecft_jax.data import loader
        loader.close(self.iterator)


def watch_training_batches(monkeypatch, on_batch):
    """Until the returned function is called, every training batch a run takes passes
    through ``on_batch(n, batch) -> batch`` (``n``: 1-based, counted over tasks)."""
    from pecft_jax.data import loader
    real, counter = loader.resume, {"n": 0}

    def resume(*args, **kwargs):
        iterator, start = real(*args, **kwargs)
        return _WatchedIterator(iterator, counter, on_batch), start

    monkeypatch.setattr(loader, "resume", resume)
    return lambda: monkeypatch.setattr(loader, "resume", real)


def crash_at_training_batch(monkeypatch, at, each_batch=None):
    """Until the returned function is called, a run crashes (:class:`Interrupted`) when it
    takes its ``at``-th training batch (1-based, counted over tasks), as if the process died
    there; ``each_batch()`` runs for every batch taken before."""
    def on_batch(n, batch):
        if n == at:
            raise Interrupted()
        if each_batch is not None:
            each_batch()
        return batch
    return watch_training_batches(monkeypatch, on_batch)


def assert_crashed_run_resumes_bit_identical(monkeypatch, tmp_path, config, crash_at):
    """``config()``'s run, crashed at its ``crash_at(whole)``-th training batch (``whole``:
    the uninterrupted run's results) and run again in the same workdir, ends as the
    uninterrupted run: the same class-IL matrix and the same task-1 checkpoint."""
    from pecft_jax.train.loop import train_and_evaluate
    whole = train_and_evaluate(config(), str(tmp_path / "whole"))
    undo = crash_at_training_batch(monkeypatch, crash_at(whole))
    with pytest.raises(Interrupted):
        train_and_evaluate(config(), str(tmp_path / "resumed"))
    undo()
    resumed = train_and_evaluate(config(), str(tmp_path / "resumed"))
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert_same_task_checkpoint(tmp_path / "whole", tmp_path / "resumed", 1)
