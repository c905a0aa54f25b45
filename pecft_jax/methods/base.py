"""What a continual method is, as the one training loop sees it.

A method declares its trainable pytree and its state, its loss, its hooks around tasks and
how it predicts. It owns no training loop, data loader or checkpoint format.

Conventions the loop relies on:

* ``trainable`` and ``state`` are nested dicts with string keys and array leaves (they are
  checkpointed as such). ``frozen`` is the backbone's parameter tree; it is an argument of
  ``loss``/``logits`` but never differentiated.
* ``loss`` and ``logits`` are traced inside ``jax.jit``; ``task`` is a static
  :class:`TaskSpec`, so each task compiles once.
* ``before_task`` / ``after_task`` run in Python between tasks (they may change shapes).
* Labels in batches are remapped to the class order: task ``t`` owns ``task.classes``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pecft_jax.backbones.backbone import Backbone

Array = jax.Array
NEG_INF = -1e9  # finite, so masked logits keep softmax/CE free of NaNs


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Static description of the task being trained (hashable: a jit static argument)."""
    index: int
    classes: Tuple[int, ...]        # this task's (remapped) classes
    seen_classes: Tuple[int, ...]   # classes of tasks 0..index
    num_classes: int                # all classes of the scenario
    num_tasks: int
    task_classes: Tuple[Tuple[int, ...], ...]  # classes of every task, by index

    def class_mask(self, which: str) -> np.ndarray:
        """Boolean (num_classes,) mask: 'task' (this task's classes), 'seen' or 'all'."""
        mask = np.zeros(self.num_classes, bool)
        if which == "task":
            mask[list(self.classes)] = True
        elif which == "seen":
            mask[list(self.seen_classes)] = True
        elif which == "all":
            mask[:] = True
        else:
            raise ValueError(f"unknown class mask {which!r}; use 'task', 'seen' or 'all'")
        return mask


def mask_logits(logits: Array, mask: np.ndarray) -> Array:
    return jnp.where(jnp.asarray(mask)[None, :], logits, NEG_INF)


def cross_entropy(logits: Array, labels: Array) -> Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def init_linear_head(rng: Array, in_dim: int, num_classes: int) -> dict:
    """A linear classifier over all classes of the scenario (trained with masking)."""
    bound = 1.0 / np.sqrt(in_dim)  # PyTorch nn.Linear's default, what the reference code uses
    k_w, k_b = jax.random.split(rng)
    return {"kernel": jax.random.uniform(k_w, (in_dim, num_classes), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(k_b, (num_classes,), jnp.float32, -bound, bound)}


def apply_linear_head(head: Mapping[str, Array], features: Array) -> Array:
    return features @ head["kernel"] + head["bias"]


class TaskData:
    """Access to a finished task's training data for ``after_task`` statistics passes.

    ``map(fn)`` runs ``fn(images) -> pytree of per-example arrays`` jit-compiled and
    sharded over the mesh on every (un-augmented) training example of the task, and returns
    the outputs concatenated as numpy arrays, plus the labels."""

    def __init__(self, iterate: Callable[[], Iterable[Tuple[dict, np.ndarray]]],
                 run_sharded: Callable):
        self._iterate = iterate
        self._run_sharded = run_sharded

    def map(self, fn: Callable[[Array], Any]) -> Tuple[Any, np.ndarray]:
        compiled = jax.jit(fn)
        outputs, labels = [], []
        for batch, mask in self._iterate():
            out = self._run_sharded(compiled, batch)
            keep = mask.astype(bool)
            outputs.append(jax.tree_util.tree_map(lambda x: np.asarray(x)[keep], out))
            labels.append(np.asarray(batch["label"])[keep])
        stacked = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *outputs)
        return stacked, np.concatenate(labels)


class Method:
    """Base class. Subclasses set ``name`` and override what they need."""
    name: str = "base"
    #: which classes' logits are kept in the training loss ('task' = L2P-style masking of
    #: classes outside the current task, 'seen', or 'all').
    train_class_mask: str = "task"
    #: a method that trains on all tasks at once (upper bound)
    joint: bool = False

    def __init__(self, config: ml_collections.ConfigDict, backbone: Backbone,
                 num_classes: int, num_tasks: int):
        self.config = config
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_tasks = num_tasks
        self.train_class_mask = config.get("train_class_mask", self.train_class_mask)

    # ------------------------------------------------------------- set-up hooks
    def init(self, rng: Array, frozen: Any) -> Tuple[dict, dict]:
        """Initial (trainable, state)."""
        raise NotImplementedError

    def before_task(self, task: TaskSpec, trainable: dict, state: dict, frozen: Any,
                    rng: Array) -> Tuple[dict, dict]:
        return trainable, state

    def after_task(self, task: TaskSpec, trainable: dict, state: dict, frozen: Any,
                   data: TaskData, rng: Array) -> dict:
        return state

    # -------------------------------------------------------------- optimiser
    def param_labels(self, trainable: dict, task: TaskSpec) -> Any:
        """Label per trainable leaf; 'frozen' leaves get no update. Default: all 'train'."""
        return jax.tree_util.tree_map(lambda _: "train", trainable)

    def optimizer_groups(self, task: TaskSpec, base: optax.GradientTransformation
                         ) -> Mapping[str, optax.GradientTransformation]:
        """Transform per label. Override for per-group learning rates."""
        return {"train": base, "frozen": optax.set_to_zero()}

    # ------------------------------------------------------------ traced parts
    def loss(self, trainable: dict, state: dict, frozen: Any, batch: Mapping[str, Array],
             rng: Array, task: TaskSpec) -> Tuple[Array, dict]:
        """Returns (scalar loss, aux). aux['metrics']: dict of scalars to log;
        aux['state']: optional new state (e.g. selection counts)."""
        raise NotImplementedError

    def logits(self, trainable: dict, state: dict, frozen: Any, images: Array,
               task: TaskSpec) -> Any:
        """Evaluation logits over all ``num_classes`` classes (the loop masks unseen ones).
        May return a dict with 'logits' and extra per-example outputs (e.g. 'task_pred')."""
        raise NotImplementedError

    # ------------------------------------------------------------ helpers
    def masked_ce(self, logits: Array, labels: Array, task: TaskSpec) -> Array:
        return cross_entropy(mask_logits(logits, task.class_mask(self.train_class_mask)), labels)

    def train_accuracy(self, logits: Array, labels: Array, task: TaskSpec) -> Array:
        """Batch accuracy over the classes the training loss sees (what is optimised; the
        class-IL accuracy over all seen classes is what the evaluation reports)."""
        return batch_accuracy(mask_logits(logits, task.class_mask(self.train_class_mask)), labels)


def batch_accuracy(logits: Array, labels: Array) -> Array:
    return (jnp.argmax(logits, -1) == labels).mean()
