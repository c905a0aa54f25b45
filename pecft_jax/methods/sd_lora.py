"""SD-LoRA: Scalable Decoupled Low-Rank Adaptation (Wu et al., ICLR 2025; official code
WuYichen-97/SD-Lora-CL, ``models/sdlora.py``, ``backbone/lora.py``).

Every task ``t`` adds a LoRA ``B_t A_t`` (rank 10) to the query and value projections of
every block, and the update is written as magnitudes times directions::

    Delta W = sum_{i<t} alpha_i B_i A_i / (||B_i||_F ||A_i||_F)  +  alpha_t B_t A_t

While task ``t`` trains, its own factors and *every* magnitude ``alpha_0..alpha_t`` learn;
the earlier directions are frozen. The magnitudes are scalars shared by all blocks and by
query and value, initialised to 0.8. The head is one linear layer over all classes
(``U(+-sqrt(3/D))`` weights, zero bias), cross-entropy over the current task's classes;
SGD with momentum 0.9, no weight decay, a constant rate.

Where the official code and the paper differ, the code is the default and our reading of
the paper an option: the code normalises an old direction by the product of its factors'
norms (``normalization='factors'``; the paper's figure: by ``||B_i A_i||_F``,
``'product'``), and it rebuilds the model every task, so every magnitude restarts at 0.8 and
only the last task's values are used (``carry_magnitudes=False``; the paper's "learnable
magnitudes" read as carried over, ``True`` -- a magnitude learnt against the unnormalised
current direction then scales its normalised form, which neither the code nor the text we
could read settles). The current task's direction is not normalised in either (with
``B_t = 0`` at the start it could not be).

SD-LoRA-RR (rank reduction) is in the official code as a commented-out block: ranks 10,
then 8 from task 4, then 6 from task 8 -- ``ranks=(10, 10, 10, 10, 8, 8, 8, 8, 6, 6)`` here
(the stacked factors keep rank 10; the columns past a task's rank stay zero). SD-LoRA-KD is
not in the official code and not here.

Fixed shapes: all tasks' factors are stacked on a task axis from the start
(``peft.lora.init_task_loras``); the per-task weights ``w_i`` of
``peft.lora.task_lora_context`` carry the magnitudes and norms (0 for tasks not trained
yet), and ``update_mask`` trains slice ``t`` and the magnitudes ``0..t``.

Folding. Where the matmuls are float32 (``peft.lora.folds_exactly``), evaluation folds every
task's weighted update into the frozen kernels (``W + sum_i w_i B_i A_i``, formed once a
step), as the official forward does with its summed weight. While task ``t`` trains, the
earlier tasks' are folded too when that costs fewer operations (below) -- their factors as
constants, their magnitudes still learning through the folded kernel (the gradient of
``alpha_i`` is ``<dL/dW, B_i A_i> / norm_i``, which needs the kernel's own gradient, a
``d_in x d_out`` product per token) -- and task ``t``'s rank-``r`` branch stays beside
them. The stacked branch costs about ``3 (d_in + d_out) T r`` multiply-adds per token and
projection (forward, input and factor gradients over all ``T`` tasks' ranks); the folded
form ``d_in d_out`` for the kernel's gradient plus ``3 (d_in + d_out) r`` for task ``t``'s
branch. Square projections of width ``D`` fold when ``D < 6 r (T - 1)``: ViT-Demo's 128
and ViT-S's 384 with ten tasks of rank 10, not ViT-B's 768 (540). The same function up to
float rounding either way.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pecft_jax.methods.base import (Method, TaskSpec, apply_linear_head, count_params,
                                    mask_task_columns)
from pecft_jax.peft.lora import (LoraConfig, fold_task_loras, folds_exactly, init_task_loras,
                                 product_norms, task_lora_context, task_slice)

Array = jax.Array
NORMALIZATIONS = ("factors", "product")


def direction_weights(lora: dict, magnitude: Array, task_index, normalization: str) -> dict:
    """``{layer: {target: (T,)}}`` weights of each task's ``B_i A_i`` after task
    ``task_index`` (may be traced): ``alpha_i / norm_i`` for earlier tasks, ``alpha_t`` for
    the current one, 0 for later ones. Norms of the frozen earlier factors are constants
    (no gradient)."""
    tasks = magnitude.shape[0]
    earlier = jnp.arange(tasks) < task_index
    current = jnp.arange(tasks) == task_index
    if normalization == "product":
        norms = product_norms(jax.lax.stop_gradient(lora))
    else:
        norms = {layer: {target: jnp.sqrt(jnp.sum(jnp.square(jax.lax.stop_gradient(f["A"])),
                                                  axis=(1, 2)))
                         * jnp.sqrt(jnp.sum(jnp.square(jax.lax.stop_gradient(f["B"])),
                                            axis=(1, 2)))
                         for target, f in targets.items()}
                 for layer, targets in lora.items()}

    def weight(norm):
        safe = jnp.where(earlier, norm, 1.0)  # no 0/0 for the zero factors of later tasks
        return jnp.where(earlier, magnitude / safe, jnp.where(current, magnitude, 0.0))
    return jax.tree_util.tree_map(weight, norms)


class SDLoRA(Method):
    name = "sd_lora"
    train_class_mask = "task"  # the official loss: logits[:, known:] (current task only)

    @dataclasses.dataclass(frozen=True)
    class Config:
        rank: int = 10                    # official inc_net.py: LoRA rank 10
        ranks: Tuple[int, ...] = ()       # SD-LoRA-RR: rank per task (empty: rank throughout)
        magnitude_init: float = 0.8       # official lora.py: scaling_factor 0.8
        normalization: str = "factors"    # official: ||B|| ||A||; the paper: ||B A|| ('product')
        carry_magnitudes: bool = False    # official: reset to 0.8 every task; paper: carry over

        def __post_init__(self):
            if not isinstance(self.rank, int) or self.rank <= 0:
                raise ValueError(f"sd_lora rank must be a positive int, got {self.rank!r}")
            if any(not 0 < r <= self.rank for r in self.ranks):
                raise ValueError(f"sd_lora ranks must lie in [1, rank={self.rank}], got "
                                 f"{self.ranks}")
            if self.normalization not in NORMALIZATIONS:
                raise ValueError(f"sd_lora normalization must be one of {NORMALIZATIONS}, got "
                                 f"{self.normalization!r}")

    def __init__(self, config, backbone, num_classes, num_tasks):
        super().__init__(config, backbone, num_classes, num_tasks)
        c = self.config
        if c.ranks and len(c.ranks) < num_tasks:
            raise ValueError(f"sd_lora ranks lists {len(c.ranks)} tasks, the scenario has "
                             f"{num_tasks}; give one rank per task")
        self.lora_cfg = LoraConfig(r=c.rank, lora_alpha=c.rank, target_modules=("query", "value"))
        ranks = c.ranks[:num_tasks] if c.ranks else (c.rank,) * num_tasks
        # (T, r) 1 on the rank columns each task uses (SD-LoRA-RR), 0 past them
        self.rank_mask = (np.arange(c.rank)[None, :] < np.asarray(ranks)[:, None]).astype(
            np.float32)
        # fold the earlier tasks while training where the kernel's gradient (D^2 a token)
        # costs less than the stacked branch's extra ranks (6 D r (T - 1)): module docstring
        dim = backbone.feature_dim
        self.fold_in_training = dim < 6 * c.rank * (num_tasks - 1)

    # ------------------------------------------------------------------ set-up
    def init(self, rng, frozen):
        k_lora, k_head = jax.random.split(rng)
        lora = init_task_loras(self.backbone.config, self.lora_cfg, self.num_tasks, k_lora)
        lora = {layer: {t: {"A": f["A"] * self.rank_mask[:, None, :], "B": f["B"]}
                        for t, f in targets.items()} for layer, targets in lora.items()}
        dim = self.backbone.feature_dim
        bound = np.sqrt(3.0 / dim)  # official linears.py: kaiming_uniform_(nonlinearity='linear')
        head = {"kernel": jax.random.uniform(k_head, (dim, self.num_classes), jnp.float32,
                                             -bound, bound),
                "bias": jnp.zeros((self.num_classes,), jnp.float32)}
        magnitude = jnp.full((self.num_tasks,), self.config.magnitude_init, jnp.float32)
        return {"lora": lora, "magnitude": magnitude, "head": head}, {}

    def before_task(self, task, trainable, state, frozen, data, rng):
        if self.config.carry_magnitudes:
            return trainable, state
        # the official code builds a new model every task: every magnitude starts again
        return dict(trainable, magnitude=jnp.full((self.num_tasks,),
                                                  self.config.magnitude_init, jnp.float32)), state

    def update_mask(self, trainable, task):
        """Task ``t``'s factors (within its rank), the magnitudes ``0..t`` and the task's
        head columns learn."""
        t = task.index
        current = (jnp.arange(self.num_tasks) == t).astype(jnp.float32)
        rank = jnp.asarray(self.rank_mask)[t]
        lora = {layer: {target: {"A": current[:, None, None] * rank[None, None, :],
                                 "B": current[:, None, None] * rank[None, :, None]}
                        for target in targets}
                for layer, targets in trainable["lora"].items()}
        return {"lora": lora,
                "magnitude": (jnp.arange(self.num_tasks) <= t).astype(jnp.float32),
                "head": mask_task_columns(trainable["head"], task)}

    # ------------------------------------------------------------------ traced
    def features(self, trainable, frozen, images, task_index, training=False):
        """The backbone with every task's weighted update after task ``task_index``;
        ``training``: task ``task_index``'s factors learn (its branch may then be kept apart
        from the folded earlier ones)."""
        lora = trainable["lora"]
        weights = direction_weights(lora, trainable["magnitude"], task_index,
                                    self.config.normalization)
        # every branch stacked: a folded update would be rounded below float32, and while
        # training folding may cost more (fold_in_training)
        stacked = (not folds_exactly(self.backbone.config.dtype)
                   or (training and not self.fold_in_training))
        if stacked:
            return self.backbone.apply(frozen, images,
                                       task_lora_context(lora, self.lora_cfg, weights),
                                       output="cls")
        if not training:
            return self.backbone.apply(fold_task_loras(frozen, lora, self.lora_cfg, weights),
                                       images, output="cls")
        earlier = jnp.arange(self.num_tasks) < task_index
        params = fold_task_loras(frozen, jax.lax.stop_gradient(lora), self.lora_cfg,
                                 jax.tree_util.tree_map(lambda w: jnp.where(earlier, w, 0.0),
                                                        weights))
        current = jax.tree_util.tree_map(
            lambda w: jax.lax.dynamic_slice_in_dim(w, task_index, 1), weights)
        return self.backbone.apply(params, images, task_lora_context(
            task_slice(lora, task_index), self.lora_cfg, current), output="cls")

    def loss(self, trainable, state, frozen, batch, rng, task: TaskSpec):
        logits = apply_linear_head(trainable["head"], self.features(
            trainable, frozen, batch["inputs"], task.index, training=True))
        ce = self.masked_ce(logits, batch, task)
        return ce, {"metrics": {"accuracy": self.train_accuracy(logits, batch, task)}}

    def logits(self, trainable, state, frozen, batch, task):
        return apply_linear_head(trainable["head"], self.features(
            trainable, frozen, batch["inputs"], task.index))

    def count_trainable(self, trainable, state):
        """Every task's factors within its rank, the magnitudes and the head."""
        per_task = sum(int(np.sum(self.rank_mask)) * (f["A"].shape[1] + f["B"].shape[2])
                       for targets in trainable["lora"].values() for f in targets.values())
        return per_task + count_params(trainable["magnitude"]) + count_params(trainable["head"])
