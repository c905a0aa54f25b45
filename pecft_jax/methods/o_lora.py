"""O-LoRA: Orthogonal Subspace Learning for continual learning (Wang et al., EMNLP Findings
2023; official code cmnfriend/O-LoRA, ``uie_trainer_lora.py``, its patched HF peft
``lora.py``).

Every task ``t`` trains a new LoRA (rank 8, ``lora_alpha`` 32, dropout 0.1, on the query and
value projections) while the earlier tasks' LoRAs stay frozen and keep adding their
updates; the loss adds

    lambda_1 * sum_{layers, targets} sum |A_old^T A_t|      (orthogonality to every earlier A)
  + lambda_2 * sum_{layers, targets} (||A_t||_F + ||B_t||_F)

with ``A_old`` every earlier task's down-projection (``A`` here is ``(d_in, r)``; the official
``lora_A`` is its transpose, ``|lora_A_old @ lora_A_new^T|``). The code sums absolute values
(the paper's equation squares them) and its L2 term -- not in the paper's objective -- is
the non-squared Frobenius norm of the new factors; lambda_1 0.5 and lambda_2 0 in the
standard-benchmark scripts. AdamW (lr 1e-3, no weight decay), the LoRA's gradient clipped
at norm 1 (``lora_grad_clip``). Each task's ``A`` is a draw of its own, as in the official
code (which re-seeds every task, but builds LoRAs of a growing rank before it draws the new
``A``, so its draws differ from task to task).

The official setting is text generation with T5 (no classifier); here, backbone-agnostic,
a linear head over all classes learns the current task's classes by cross-entropy over
them (earlier columns frozen) -- our choice, stated in the configs.

Fixed shapes: all tasks' LoRAs are stacked on a task axis from the start
(``peft.lora.init_task_loras``; ``B`` of later tasks is zero, so summing every task's
LoRA is summing the trained ones, as the official concatenation along the rank does);
``update_mask`` trains slice ``t``; the orthogonality term masks the tasks after ``t``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from pecft_jax.methods.base import (Method, TaskSpec, apply_linear_head, count_params,
                                    init_linear_head, mask_task_columns, mask_task_slice)
from pecft_jax.peft.lora import LoraConfig, init_task_loras, task_lora_context

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST


def orthogonality_loss(lora: dict, task_index) -> Array:
    """``sum |A_s^T A_t|`` over every adapted projection and every task ``s < t`` (``t`` may
    be traced); 0 on the first task."""
    total = jnp.zeros((), jnp.float32)
    for targets in lora.values():
        for f in targets.values():
            a = f["A"]                                                      # (T, d_in, r)
            new = a[task_index]                                             # (d_in, r)
            overlap = jnp.einsum("sir,ik->srk", a, new, precision=HIGHEST)  # (T, r, r)
            earlier = (jnp.arange(a.shape[0]) < task_index)[:, None, None]
            total = total + jnp.sum(jnp.where(earlier, jnp.abs(overlap), 0.0))
    return total


def _norm(x: Array, eps: float = 1e-12) -> Array:
    """``||x||_F`` with a finite gradient at 0 (where ``B`` starts; the official torch.norm
    has subgradient 0 there, ``sqrt`` in JAX would give NaN)."""
    sq = jnp.sum(jnp.square(x))
    safe = jnp.where(sq > eps, sq, 1.0)
    return jnp.where(sq > eps, jnp.sqrt(safe), 0.0)


def l2_loss(lora: dict, task_index) -> Array:
    """``sum (||A_t||_F + ||B_t||_F)`` over every adapted projection (the official lambda_2
    term)."""
    return sum(_norm(f["A"][task_index]) + _norm(f["B"][task_index])
               for targets in lora.values() for f in targets.values())


class OLoRA(Method):
    name = "o_lora"
    train_class_mask = "task"

    @dataclasses.dataclass(frozen=True)
    class Config:
        rank: int = 8                          # official run_uie_lora.py: lora_r default
        lora_alpha: float = 32.0               # official run_uie_lora.py: hard-coded 32
        lora_dropout: float = 0.1              # official run_uie_lora.py: hard-coded 0.1
        target_modules: tuple = ("query", "value")  # HF peft's T5 default (q, v)
        lambda_1: float = 0.5                  # official scripts (orders 1-3): lamda_1 0.5
        lambda_2: float = 0.0                  # official scripts (orders 1-3): lamda_2 0
        lora_grad_clip: float = 1.0            # official scripts: max_grad_norm 1 (0 = off)

        def __post_init__(self):
            if self.lambda_1 < 0 or self.lambda_2 < 0:
                raise ValueError(f"o_lora lambda_1 and lambda_2 must be >= 0, got "
                                 f"{self.lambda_1} and {self.lambda_2}")

    def __init__(self, config, backbone, num_classes, num_tasks):
        super().__init__(config, backbone, num_classes, num_tasks)
        c = self.config
        self.lora_cfg = LoraConfig(r=c.rank, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                                   target_modules=c.target_modules)

    def init(self, rng, frozen):
        k_lora, k_head = jax.random.split(rng)
        return {"lora": init_task_loras(self.backbone.config, self.lora_cfg, self.num_tasks,
                                        k_lora),
                "head": init_linear_head(k_head, self.backbone.feature_dim, self.num_classes)}, {}

    def param_labels(self, trainable, task):
        return {"lora": jax.tree_util.tree_map(lambda _: "lora", trainable["lora"]),
                "head": jax.tree_util.tree_map(lambda _: "head", trainable["head"])}

    def optimizer_groups(self, task, base):
        """The official gradient clipping covers the LoRA factors (its T5 has no head); the
        head, ours, is not clipped."""
        clip = self.config.lora_grad_clip
        lora = optax.chain(optax.clip_by_global_norm(clip), base) if clip else base
        return {"lora": lora, "head": base}

    def update_mask(self, trainable, task):
        """Task ``t``'s LoRA (slice ``t``) and head columns learn."""
        return {"lora": mask_task_slice(trainable["lora"], task.index, self.num_tasks),
                "head": mask_task_columns(trainable["head"], task)}

    def features(self, trainable, frozen, images, deterministic=True, rng=None):
        return self.backbone.apply(frozen, images,
                                   task_lora_context(trainable["lora"], self.lora_cfg),
                                   output="cls", deterministic=deterministic, dropout_rng=rng)

    def loss(self, trainable, state, frozen, batch, rng, task: TaskSpec):
        c = self.config
        logits = apply_linear_head(trainable["head"], self.features(
            trainable, frozen, batch["inputs"], deterministic=False, rng=rng))
        ce = self.masked_ce(logits, batch, task)
        orth = orthogonality_loss(trainable["lora"], task.index)
        l2 = l2_loss(trainable["lora"], task.index)
        return ce + c.lambda_1 * orth + c.lambda_2 * l2, {
            "metrics": {"ce": ce, "orthogonality": orth, "l2": l2,
                        "accuracy": self.train_accuracy(logits, batch, task)}}

    def logits(self, trainable, state, frozen, batch, task):
        return apply_linear_head(trainable["head"],
                                 self.features(trainable, frozen, batch["inputs"]))

    def count_trainable(self, trainable, state):
        return count_params(trainable)
