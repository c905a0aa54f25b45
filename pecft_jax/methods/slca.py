"""SLCA: Slow Learner with Classifier Alignment (Zhang et al., ICCV 2023; official code
GengDavid/SLCA, ``models/slca.py``, ``models/base.py``, ``convs/linears.py``).

Algorithm, per task ``t``:

* **Slow learner.** The whole backbone and a linear head learn by cross-entropy over the
  current task's classes only (the official loss slices the logits to them), SGD with
  momentum 0.9 and weight decay 5e-4 -- the backbone at a hundredth of the head's rate.
  That is *not* in this file: it is a parameter group of the config,
  ``train.lr_mults = (("^backbone/", 0.01),)`` (the official ``bcb_lrscale``). The head is one
  linear layer per task (weights ``N(0, 0.02)``, the official ``trunc_normal_(std=.02)``
  whose bounds are +-2 in absolute value, bias 0); earlier tasks' heads are frozen, which
  here is the update mask on the head's columns.
* **Statistics.** After training, the mean and the (unbiased) covariance of every *new*
  class's feature -- the [CLS] token after the final LayerNorm, on its un-augmented
  training images -- are stored; earlier classes keep theirs (the backbone has moved since,
  and no image of theirs is kept).
* **Classifier Alignment** (from task 1 on). All heads are re-trained on features drawn
  from the Gaussians of every seen class (covariance + 1e-4 I): 5 epochs, each drawing 256
  features per class and taking one pass in batches of 256, SGD (lr 0.01, momentum 0.9,
  weight decay 5e-4, cosine over the epochs), cross-entropy on logit-normalised logits
  ``z / (mean_t ||z_t|| + 1e-7) / tau`` (``z_t`` the logits of task ``t``'s classes, the mean
  over the seen tasks, tau 0.1; the official ``ca_with_logit_norm``).

Prediction: argmax of the aligned head's logits over the seen classes.

Where the official code does more than the paper says, this file follows the code (each an
option): it replaces the pre-trained final LayerNorm by a fresh one (weight 1, bias 0)
that learns with the backbone (``fresh_final_norm``; its eps stays the backbone's 1e-6,
the fresh PyTorch one has 1e-5); it draws the features of class ``c`` around
``(0.9 + 0.1 (t_c + 1) / (t + 1)) mu_c`` (``mean_decay``); and it evaluates task ``t``
with the aligned head but trains task ``t + 1`` -- and aligns again -- from the heads as
they were before the alignment (``keep_aligned_head=False``: the official ``fc.recall()``).

Trainable: the backbone copy and the ``(D, C)`` head. State: the class statistics (mean,
covariance, count; ``C x D x D`` floats -- kept out of the compiled steps) and the aligned
head used for prediction.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pecft_jax.methods import statistics as stats_lib
from pecft_jax.methods.base import (Method, TaskSpec, apply_linear_head, count_params,
                                    mask_task_columns)

Array = jax.Array


def task_logit_norm(logits: Array, class_mask: Array, task_of_class: np.ndarray,
                    temperature: float) -> Array:
    """SLCA's logit normalisation: ``z / n / tau`` with ``n = mean_t (||z_t|| + 1e-7)`` over
    the tasks whose classes are in ``class_mask`` (``z_t``: the logits of task ``t``'s
    classes). The gradient flows through ``n``, as in the official code."""
    num_tasks = int(np.max(task_of_class)) + 1
    membership = jnp.asarray(np.arange(num_tasks)[:, None] == task_of_class[None, :],
                             logits.dtype)                                        # (T, C)
    seen = (membership @ jnp.asarray(class_mask, logits.dtype)) > 0               # (T,)
    norms = jnp.sqrt(jnp.square(logits) @ membership.T) + 1e-7                    # (B, T)
    mean_norm = jnp.sum(jnp.where(seen, norms, 0.0), -1) / jnp.sum(seen)
    return logits / mean_norm[:, None] / temperature


class SLCA(Method):
    name = "slca"
    train_class_mask = "task"  # the official loss: logits[:, known:] (current task only)

    @dataclasses.dataclass(frozen=True)
    class Config:
        fresh_final_norm: bool = True     # official convs/vits.py: del model.norm; LayerNorm(768)
        head_init_std: float = 0.02       # official linears.py: trunc_normal_(std=.02), bias 0
        ca_epochs: int = 5                # official json "ca_epochs"; 0 = no alignment
        ca_samples: int = 256             # official slca.py: num_sampled_pcls (per class, epoch)
        ca_lr: float = 0.01               # official: the stage-1 lrate
        ca_momentum: float = 0.9
        ca_weight_decay: float = 5e-4
        ridge: float = 1e-4               # official base.py: torch.cov(...) + 1e-4 * I
        logit_norm: float = 0.1           # tau, official json "ca_with_logit_norm"; 0 = off
        mean_decay: float = 0.1           # official slca.py: mean * (0.9 + 0.1 (t_c+1)/(t+1))
        keep_aligned_head: bool = False   # official: fc.recall() after evaluation

        def __post_init__(self):
            if self.ca_epochs < 0 or self.ca_samples <= 0:
                raise ValueError(f"slca ca_epochs must be >= 0 and ca_samples > 0, got "
                                 f"{self.ca_epochs} and {self.ca_samples}")
            if self.logit_norm < 0 or self.ridge < 0 or not 0 <= self.mean_decay < 1:
                raise ValueError(f"slca logit_norm and ridge must be >= 0 and mean_decay in "
                                 f"[0, 1), got {self.logit_norm}, {self.ridge}, "
                                 f"{self.mean_decay}")

    def __init__(self, config, backbone, num_classes, num_tasks):
        super().__init__(config, backbone, num_classes, num_tasks)
        self._alignment = None  # compiled once, on the first task that aligns

    # ------------------------------------------------------------------ set-up
    def init(self, rng, frozen):
        copy = jax.tree_util.tree_map(jnp.array, dict(frozen))
        if self.config.fresh_final_norm:
            if "encoder_norm" not in copy.get("Transformer", {}):
                raise ValueError(f"slca fresh_final_norm re-initialises the final encoder_norm "
                                 f"of a pre-LN ViT; {self.backbone.config.name} has none (a "
                                 f"post-LN BERT ends each block with its own LayerNorm): set "
                                 f"method.fresh_final_norm=False")
            norm = copy["Transformer"]["encoder_norm"]
            copy["Transformer"] = dict(copy["Transformer"], encoder_norm={
                "scale": jnp.ones_like(norm["scale"]), "bias": jnp.zeros_like(norm["bias"])})
        dim = self.backbone.feature_dim
        head = {"kernel": self.config.head_init_std
                * jax.random.normal(rng, (dim, self.num_classes), jnp.float32),
                "bias": jnp.zeros((self.num_classes,), jnp.float32)}
        stats = stats_lib.statistics_shapes(self.num_classes, dim, "covariance")
        state = {"stats": {k: jnp.zeros(shape, jnp.float32) for k, shape in stats.items()},
                 "head": jax.tree_util.tree_map(jnp.array, head)}
        return {"backbone": copy, "head": head}, state

    def update_mask(self, trainable, task):
        """The backbone learns; of the head only the current task's classes (per-task heads,
        the earlier ones frozen -- also against weight decay)."""
        return {"backbone": jax.tree_util.tree_map(lambda _: jnp.float32(1),
                                                   trainable["backbone"]),
                "head": mask_task_columns(trainable["head"], task)}

    def step_state(self, state):
        return {"head": state["head"]}  # the statistics stay out of the compiled steps

    # ------------------------------------------------------------------ traced
    def features(self, backbone_params, images) -> Array:
        return self.backbone.apply(backbone_params, images, output="cls")

    def loss(self, trainable, state, frozen, batch, rng, task: TaskSpec):
        logits = apply_linear_head(trainable["head"],
                                   self.features(trainable["backbone"], batch["inputs"]))
        ce = self.masked_ce(logits, batch, task)
        return ce, {"metrics": {"accuracy": self.train_accuracy(logits, batch, task)}}

    def logits(self, trainable, state, frozen, batch, task):
        return apply_linear_head(state["head"],
                                 self.features(trainable["backbone"], batch["inputs"]))

    # -------------------------------------------------------------- after task
    def after_task(self, task, trainable, state, frozen, data, rng):
        c = self.config
        features, labels = data.map(self.feature_pass, trainable["backbone"])
        stats = stats_lib.update_statistics(jax.device_get(state["stats"]), features, labels,
                                            task.classes)
        head = trainable["head"]
        if task.index > 0 and c.ca_epochs:
            head = stats_lib.realign_seen_heads(self.alignment(task), head, stats, task, rng,
                                                ridge=c.ridge, mean_decay=c.mean_decay)
        if c.keep_aligned_head:
            trainable = dict(trainable, head=head)
        return trainable, jax.device_put({"stats": stats,
                                          "head": jax.tree_util.tree_map(jnp.array, head)})

    def feature_pass(self, batch, backbone_params):
        """A batch's [CLS] features under the trained backbone (a TaskData pass)."""
        return self.features(backbone_params, batch["inputs"])

    def alignment(self, task: TaskSpec) -> stats_lib.ClassifierFit:
        if self._alignment is None:
            c, owner = self.config, task.task_of_class()
            transform = None
            if c.logit_norm:
                transform = lambda z, mask: task_logit_norm(z, mask, owner, c.logit_norm)
            self._alignment = stats_lib.alignment_fit(
                apply_linear_head, learning_rate=c.ca_lr, epochs=c.ca_epochs,
                samples=c.ca_samples, momentum=c.ca_momentum,
                weight_decay=c.ca_weight_decay, logit_transform=transform)
        return self._alignment

    def count_trainable(self, trainable, state):
        return count_params(trainable)
