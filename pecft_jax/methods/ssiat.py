"""SSIAT: Semantically-Shifted Incremental Adapter-Tuning (Tan et al., CVPR 2024; official
code HAIV-Lab/SSIAT, ``models/SSITA_adapter.py``, ``models/base.py``).

Algorithm, per task ``t``:

* **Incremental adapter tuning.** One AdaptFormer adapter set (bottleneck 64 in every
  block, parallel to the MLP, scale 0.1, dropout 0.1) is *shared* by all tasks and keeps
  training on each, with a cosine classifier (one bias-free head per task, ``N(0, 0.02)``):
  CosFace ``CE(s (cos - m 1_y))`` over the current task's classes only (s = 20, m = 0),
  SGD with momentum 0.9 and weight decay 5e-4, lr 0.01 on a per-epoch cosine; 20 epochs on
  the first task, 10 on the later ones. Earlier heads take no part in the loss but stay in
  the official optimizer, so its coupled weight decay shrinks them (their cosines do not
  change; the re-training below starts from the shrunk heads); heads of later tasks do not
  exist yet and stay as initialised.
* **Semantic shift.** The adapter moved, so the stored class means of earlier classes are
  moved by the drift it caused on the current task's images: with ``y1 = f_{t-1}(x_i)`` and
  ``y2 = f_t(x_i)`` (the model before and after this task's training, un-augmented images),
  ``w_ci = exp(-||y1_i - mu_c||^2 / (2 sigma^2)) + 1e-5`` (sigma 4) and
  ``mu_c += sum_i w_ci (y2_i - y1_i) / sum_i w_ci``. Covariances are kept as they were.
* **Statistics** of every new class under the new model: mean and unbiased covariance.
* **Unified classifier re-training** (from task 1 on): all heads re-trained on features
  drawn from the Gaussians of every seen class (covariance + 1e-3 I) -- 5 epochs of 256
  draws per class, one pass in batches of 256, SGD lr 0.01, momentum 0.9, weight decay
  5e-4, cosine -- cross-entropy on ``s cos``. Like SLCA's code, the official code draws
  class ``c``'s features around ``(0.9 + 0.1 (t_c + 1) / (t + 1)) mu_c`` (``mean_decay``).

Prediction: argmax of ``cos(f(x), w_c)`` over the seen classes.

Pairing of ``y1`` and ``y2``: the official code takes them from two passes of its
*shuffled, augmented* training loader (``SSITA_adapter.py`` ``incremental_train``), so row
``i`` of the two is usually two different images under two different crops.
``shift_pairing='same_image'`` (the default) pairs each un-augmented image with itself, the
drift the paper's figure shows, computed on the devices in one :meth:`TaskData.reduce` with
the adapter from before the task kept in the state; ``'official'`` (the paper configs)
takes ``y1`` from one augmented pass under the earlier adapter and ``y2`` from another under
the trained one, paired in a random order (:func:`official_pairs`): the released code's
estimator, in distribution.

Trainable: the shared adapter and the ``(D, C)`` cosine head. State: the class statistics
(shifted means, covariances, counts; kept out of the compiled steps) and the adapter as it
was at the start of the task.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from pecft_jax import compiler, peft
from pecft_jax.methods import statistics as stats_lib
from pecft_jax.methods.base import Method, TaskSpec, config_field
from pecft_jax.methods.common import host_seed
from pecft_jax.peft.prompt_pool import cosine_similarity

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST


def semantic_shift(carry: dict, before: Array, after: Array, means: Array, weight: Array,
                   sigma: float) -> dict:
    """Adds a batch to the drift sums of every stored class mean: ``num_c += sum_i w_ci
    (after_i - before_i)`` and ``den_c += sum_i w_ci`` with ``w_ci = (exp(-||before_i -
    mu_c||^2 / (2 sigma^2)) + 1e-5) * weight_i`` (``weight`` 0 on padding). The shift of
    class ``c`` is ``num_c / den_c``."""
    sq = (jnp.sum(jnp.square(before), -1)[None, :] + jnp.sum(jnp.square(means), -1)[:, None]
          - 2.0 * jnp.matmul(means, before.T, precision=HIGHEST))                 # (C, B)
    w = (jnp.exp(-jnp.maximum(sq, 0.0) / (2.0 * sigma ** 2)) + 1e-5) * weight[None, :]
    return {"num": carry["num"] + jnp.matmul(w, after - before, precision=HIGHEST),
            "den": carry["den"] + w.sum(-1)}


SHIFT_PAIRINGS = ("same_image", "official")


def official_pairs(key: Array, n: int) -> np.ndarray:
    """The row of the second pass paired with each row of the first, ``(n,)``: a uniformly
    random permutation (the two passes of a shuffled loader meet in independent orders)."""
    return np.random.default_rng(host_seed(key)).permutation(n)


class SSIAT(Method):
    name = "ssiat"
    train_class_mask = "task"  # the official loss: logits[:, known:] (current task only)

    @dataclasses.dataclass(frozen=True)
    class Config:
        # official inc_net.py: ffn_num 64, parallel, scalar 0.1, 'lora' init; dropout 0.1
        adapter: peft.AdapterConfig = config_field(
            lambda: peft.AdapterConfig(bottleneck_dim=64, mode="parallel", scale=0.1,
                                       dropout=0.1))
        head_init_std: float = 0.02       # official classifier.py: trunc_normal_(std=.02)
        scale: float = 20.0               # official json "scale" (CosFace s)
        margin: float = 0.0               # official json "margin" (0.3 for ImageNet-A)
        incremental_epochs: Optional[int] = 10  # json inc_epochs; task 0: train.epochs (20)
        shift: bool = True                # official json "ssca"
        shift_sigma: float = 4.0          # official SSITA_adapter.py: sigma=4.0
        # 'same_image' (the paper's drift) or 'official' (two shuffled augmented passes)
        shift_pairing: str = "same_image"
        ca_epochs: int = 5                # official json "ca_epochs"; 0 = no re-training
        ca_samples: int = 256             # official base.py: num_sampled_pcls
        ca_lr: float = 0.01               # official: init_lr
        ca_momentum: float = 0.9
        ca_weight_decay: float = 5e-4
        ridge: float = 1e-3               # official base.py: torch.cov(...) + 1e-3 * I
        mean_decay: float = 0.1           # official base.py: mean * (0.9 + 0.1 (t_c+1)/(t+1))

        def __post_init__(self):
            if self.shift_pairing not in SHIFT_PAIRINGS:
                raise ValueError(f"ssiat shift_pairing must be one of {SHIFT_PAIRINGS}, got "
                                 f"{self.shift_pairing!r}")
            if self.scale <= 0 or self.shift_sigma <= 0:
                raise ValueError(f"ssiat scale and shift_sigma must be > 0, got {self.scale} "
                                 f"and {self.shift_sigma}")
            if self.incremental_epochs is not None and self.incremental_epochs < 0:
                raise ValueError(f"ssiat incremental_epochs must be >= 0 (or None: "
                                 f"train.epochs), got {self.incremental_epochs}")
            if self.ca_epochs < 0 or self.ca_samples <= 0 or not 0 <= self.mean_decay < 1:
                raise ValueError(f"ssiat needs ca_epochs >= 0, ca_samples > 0 and mean_decay "
                                 f"in [0, 1), got {self.ca_epochs}, {self.ca_samples}, "
                                 f"{self.mean_decay}")

    def __init__(self, config, backbone, num_classes, num_tasks):
        super().__init__(config, backbone, num_classes, num_tasks)
        c = self.config
        self._shift = compiler.jit(semantic_shift, static_argnums=5)
        self._alignment = stats_lib.alignment_fit(
            self.scaled_cosine, learning_rate=c.ca_lr, epochs=max(1, c.ca_epochs),
            samples=c.ca_samples, momentum=c.ca_momentum, weight_decay=c.ca_weight_decay)

    # ------------------------------------------------------------------ set-up
    def init(self, rng, frozen):
        k_adapter, k_head = jax.random.split(rng)
        dim = self.backbone.feature_dim
        adapter = peft.init_adapters(self.backbone.config, self.config.adapter, k_adapter)
        head = {"kernel": self.config.head_init_std
                * jax.random.normal(k_head, (dim, self.num_classes), jnp.float32)}
        stats = stats_lib.statistics_shapes(self.num_classes, dim, "covariance")
        state = {"stats": {k: jnp.zeros(shape, jnp.float32) for k, shape in stats.items()},
                 "adapter_before": jax.tree_util.tree_map(jnp.array, adapter)}
        return {"adapter": adapter, "head": head}, state

    def train_epochs(self, task, default):
        later = self.config.incremental_epochs
        return default if task.index == 0 or later is None else int(later)

    def before_task(self, task, trainable, state, frozen, data, rng):
        # the model before this task's training, for the semantic shift after it
        return trainable, dict(state, adapter_before=jax.tree_util.tree_map(
            jnp.array, trainable["adapter"]))

    def update_mask(self, trainable, task):
        """The shared adapter learns; the head's columns of the classes seen so far take the
        optimizer's step (the loss reaches the current task's only: the earlier ones get
        the official code's weight decay), those of later tasks none."""
        return {"adapter": jax.tree_util.tree_map(lambda _: jnp.float32(1),
                                                  trainable["adapter"]),
                "head": {"kernel": jnp.asarray(task.class_mask("seen"), jnp.float32)}}

    def step_state(self, state):
        return {}  # the steps read neither the statistics nor the earlier adapter

    # ------------------------------------------------------------------ traced
    def features(self, adapter, frozen, images, deterministic=True, rng=None) -> Array:
        """The adapted model's [CLS] token after the final LayerNorm."""
        return self.backbone.apply(frozen, images, peft.adapter_context(adapter,
                                                                        self.config.adapter),
                                   output="cls", deterministic=deterministic, dropout_rng=rng)

    def scaled_cosine(self, head, features) -> Array:
        return self.config.scale * cosine_similarity(features, head["kernel"].T)

    def loss(self, trainable, state, frozen, batch, rng, task: TaskSpec):
        f = self.features(trainable["adapter"], frozen, batch["inputs"], False, rng)
        logits = self.scaled_cosine(trainable["head"], f)
        labels = batch["label"]
        margin = self.config.scale * self.config.margin * jax.nn.one_hot(
            labels, self.num_classes, dtype=logits.dtype)  # CosFace: s (cos - m) at the label
        ce = self.masked_ce(logits - margin, batch, task)
        return ce, {"metrics": {"accuracy": self.train_accuracy(logits, batch, task)}}

    def logits(self, trainable, state, frozen, batch, task):
        return self.scaled_cosine(trainable["head"],
                                  self.features(trainable["adapter"], frozen, batch["inputs"]))

    # -------------------------------------------------------------- after task
    def after_task(self, task, trainable, state, frozen, data, rng):
        c, t = self.config, task.index
        stats = jax.device_get(state["stats"])
        if t > 0 and c.shift:
            old = stats["count"] > 0
            sums = {"num": np.zeros((self.num_classes, self.backbone.feature_dim), np.float32),
                    "den": np.zeros((self.num_classes,), np.float32)}
            before, after = state["adapter_before"], trainable["adapter"]
            if c.shift_pairing == "same_image":
                drift = data.reduce(self.drift_pass, sums, before, after, frozen,
                                    jnp.asarray(stats["mean"]), additive=True)
            else:  # the official two passes (a fold_in: the alignment keeps ``rng``)
                y1, _ = data.augmented(0).map(self.feature_pass, before, frozen)
                y2, _ = data.augmented(1).map(self.feature_pass, after, frozen)
                y2 = y2[official_pairs(jax.random.fold_in(rng, 1), len(y2))]
                drift = self._shift(sums, y1, y2, stats["mean"], np.ones(len(y1), np.float32),
                                    c.shift_sigma)
            drift = jax.device_get(drift)
            shift = drift["num"] / np.maximum(drift["den"], 1e-30)[:, None]
            stats = dict(stats, mean=stats["mean"] + shift * old[:, None])
        features, labels = data.map(self.feature_pass, trainable["adapter"], frozen)
        stats = stats_lib.update_statistics(stats, features, labels, task.classes)
        head = trainable["head"]
        if t > 0 and c.ca_epochs:
            head = stats_lib.realign_seen_heads(self._alignment, head, stats, task, rng,
                                                ridge=c.ridge, mean_decay=c.mean_decay)
        return dict(trainable, head=head), dict(state, stats=jax.device_put(stats))

    def drift_pass(self, carry, batch, before, after, frozen, means):
        """Adds a batch's feature drift under this task's training to every class mean's
        shift sums (a TaskData reduction: the same images through both models)."""
        y1 = self.features(before, frozen, batch["inputs"])
        y2 = self.features(after, frozen, batch["inputs"])
        return semantic_shift(carry, y1, y2, means, batch["mask"], self.config.shift_sigma)

    def feature_pass(self, batch, adapter, frozen):
        """A batch's features under the adapted model (a TaskData pass)."""
        return self.features(adapter, frozen, batch["inputs"])
