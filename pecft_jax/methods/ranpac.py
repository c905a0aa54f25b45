"""RanPAC: random projections and a ridge-regression head over a (first-session adapted)
frozen pre-trained model (McDonnell et al., NeurIPS 2023; official code RanPAC/RanPAC,
``RanPAC.py``; defaults from ``args/cifar224_publish.csv`` row 7, "RanPAC").

Algorithm:

* **Phase 1** (first task only, optional): parameter-efficient adaptation of the backbone on
  the first task's data -- an AdaptFormer adapter (CIFAR-100), SSF (ImageNet-R) or VPT-deep,
  with a cosine classifier ``sigma * cos(f, w_c)`` (learnable ``sigma``, starts at 1) over the
  first task's classes, cross-entropy, SGD; then the backbone and its module are frozen for
  good and that classifier is dropped.
* **Phase 2** (every task): ``h = ReLU(f W_rand)``, ``f`` the adapted model's [CLS] feature
  (after the final LayerNorm), ``W_rand ~ N(0, 1)`` of ``d x M`` drawn once [M = 10,000];
  ``G += sum h^T h`` and ``Q += sum h^T y`` over the task's un-augmented training images
  (``y`` one-hot over all classes of the run); head ``W = (G + lambda I)^-1 Q``;
  logits ``h W``. ``M = 0`` skips the projection (``h = f``, the paper's "no RPs" ablation).
* **lambda**, re-chosen every task from ``10^-8 .. 10^8`` (17 values) on the *current task's*
  data only: fit ``(G_fit + lambda I)^-1 Q_fit`` on a random 80% of its examples, keep the
  lambda of least mean squared error on the other 20% (ties: the smallest), as the official
  ``optimise_ridge_parameter`` does (it takes the first 80% of a shuffled loader).

Only ``G``, ``Q`` and ``W_rand`` are stored (and the solved head) -- no exemplars. Sums,
solves and the validation errors all run on the devices: ``TaskData.reduce`` accumulates
``G`` and ``Q`` sharded over the mesh, and the validation error of every lambda comes from
the held-out split's own Gram statistics,
``||H_v W - Y_v||^2 = tr(W^T G_v W) - 2 tr(W^T Q_v) + n_v``, so no per-example feature
leaves the device and the backbone runs once per example.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pecft_jax import compiler, peft
from pecft_jax.methods.base import Method, TaskSpec, config_field, count_params
from pecft_jax.methods.common import cached_fixed_features, frozen_query, host_seed
from pecft_jax.methods.first_session import ADAPTATIONS, FirstSession

Array = jax.Array
log = logging.getLogger("pecft_jax")
# Full float32 products for the ridge algebra: the default precision of an accelerator may
# round float32 matmul inputs (TF32 on recent GPUs), and the solve for small lambdas is
# ill-conditioned; the official code computes all of it in float32.
HIGHEST = jax.lax.Precision.HIGHEST


def _dot(a: Array, b: Array) -> Array:
    return jnp.matmul(a, b, precision=HIGHEST)
OFFICIAL_RIDGES = tuple(float(10.0 ** e) for e in range(-8, 9))


# ----------------------------------------------------------------------------- ridge pieces
def add_gram(carry: dict, h: Array, y: Array, weight: Array) -> dict:
    """``G += (w h)^T h`` and ``Q += (w h)^T y`` for per-example weights ``w`` (0/1 masks)."""
    hw = h * weight[:, None]
    return {"G": carry["G"] + _dot(hw.T, h), "Q": carry["Q"] + _dot(hw.T, y)}


def ridge_solve(G: Array, Q: Array, ridge) -> Array:
    """``(G + ridge I)^-1 Q`` (a linear solve, as the official code: better conditioned
    than forming the inverse)."""
    with jax.default_matmul_precision("highest"):  # traced in jit: applies to the solve
        return jnp.linalg.solve(G + ridge * jnp.eye(G.shape[0], dtype=G.dtype), Q)


def fit_split(num_examples: int, fraction: float, rng: Array) -> np.ndarray:
    """Which of a task's examples fit the head while lambda is chosen: a random
    ``int(fraction * n)`` of them (the official code takes the first 80% of a shuffled
    loader); the rest are held out."""
    order = np.random.default_rng(host_seed(rng)).permutation(num_examples)
    fit = np.zeros(num_examples, bool)
    fit[order[:int(num_examples * fraction)]] = True
    return fit


def validation_errors(fit: dict, val: dict, n_val: Array, ridges: Array) -> Array:
    """Mean squared error on the held-out split of the head fitted on the fit split, per
    ridge: ``(tr(W^T G_v W) - 2 tr(W^T Q_v) + n_v) / (n_v C)`` with ``W`` from ``fit``
    (``n_v`` = number of held-out one-hot rows, so ``||Y_v||^2 = n_v``)."""
    num_classes = fit["Q"].shape[1]

    def error(ridge):
        w = ridge_solve(fit["G"], fit["Q"], ridge)
        sse = jnp.sum(_dot(val["G"], w) * w) - 2.0 * jnp.sum(w * val["Q"]) + n_val
        # a near-singular fit (the smallest lambdas) can overflow: never the minimum
        sse = jnp.where(jnp.isfinite(sse), jnp.maximum(sse, 0.0), jnp.inf)
        return sse / (n_val * num_classes)

    return jax.lax.map(error, ridges)


def add_task_and_solve(G: Array, Q: Array, sums: dict, ridge) -> tuple:
    """``G`` and ``Q`` with a task's fit and held-out sums added, and the head
    ``(G + ridge I)^-1 Q`` they give: one program (added eagerly, each sum compiled a
    program of its own for every shape and placement of its operands)."""
    G = G + sums["fit"]["G"] + sums["val"]["G"]
    Q = Q + sums["fit"]["Q"] + sums["val"]["Q"]
    return G, Q, ridge_solve(G, Q, ridge)


# compiled once per process (a fresh jax.jit per call would trace again every task)
_validation_errors = compiler.jit(validation_errors)
_add_task_and_solve = compiler.jit(add_task_and_solve)


class RanPAC(Method):
    name = "ranpac"

    @dataclasses.dataclass(frozen=True)
    class Config:
        M: int = 10_000                   # random-projection width; 0 = no projection
        ridges: Tuple[float, ...] = OFFICIAL_RIDGES
        fit_fraction: float = 0.8         # of the task's examples fit lambda; the rest score it
        # Phase 1: 'adapter' | 'ssf' | 'prompt' (VPT) | 'lora' | 'full', or 'none' (none)
        first_session: str = "adapter"
        adapter: peft.AdapterConfig = config_field(  # official: AdaptFormer, ffn_num=64
            lambda: peft.AdapterConfig(bottleneck_dim=64, mode="parallel", scale=0.1,
                                       dropout=0.1))
        # official petl/vision_transformer_ssf.py (RevisitingCIL's): every block's eight
        # points plus the patch embedding and the final norm, N(1, 0.02) / N(0, 0.02)
        ssf: peft.SSFConfig = config_field(
            lambda: peft.SSFConfig(init="paper", model_points=("embed", "final")))
        prompt: peft.PromptConfig = config_field(  # official VPT: deep, 5 tokens, zeros
            lambda: peft.PromptConfig(length=5, deep=True, init="zeros"))
        lora: peft.LoraConfig = config_field(lambda: peft.LoraConfig(r=8, lora_alpha=16))

        def __post_init__(self):
            if self.first_session not in ("none",) + ADAPTATIONS:
                raise ValueError(f"ranpac first_session must be 'none' or one of "
                                 f"{ADAPTATIONS}, got {self.first_session!r}")
            if self.M < 0:
                raise ValueError(f"ranpac M must be >= 0 (0 = no random projection), got "
                                 f"{self.M}")
            if not self.ridges or min(self.ridges) <= 0:
                raise ValueError(f"ranpac ridges must be positive values, got {self.ridges}")
            if not 0.0 < self.fit_fraction < 1.0:
                raise ValueError(f"ranpac fit_fraction must be in (0, 1), got "
                                 f"{self.fit_fraction}")

    def __init__(self, config, backbone, num_classes, num_tasks):
        super().__init__(config, backbone, num_classes, num_tasks)
        kind = self.config.first_session
        self.adapted = (None if kind == "none"
                        else FirstSession(kind, getattr(self.config, kind, None), backbone))
        # without a module phase 2 reads the frozen query, which the loop may precompute
        self.uses_frozen_query = self.adapted is None
        # with one, its feature is fixed once task 0 ends: the loop may cache the test sets'
        self.features_fixed_after = None if self.adapted is None else 0
        self.width = self.config.M or backbone.feature_dim  # the width of h

    # ------------------------------------------------------------------ set-up
    def init(self, rng, frozen):
        k_peft, k_head, k_rand = jax.random.split(rng, 3)
        dim, m, c = self.backbone.feature_dim, self.width, self.num_classes
        trainable = {}
        if self.adapted:
            trainable = self.adapted.init(k_peft, k_head, frozen, c)
        state = {"G": jnp.zeros((m, m), jnp.float32), "Q": jnp.zeros((m, c), jnp.float32),
                 "head": jnp.zeros((m, c), jnp.float32),
                 "ridge": jnp.zeros((self.num_tasks,), jnp.float32)}
        if self.config.M:
            state["w_rand"] = jax.random.normal(k_rand, (dim, self.config.M), jnp.float32)
        return trainable, state

    def train_epochs(self, task, default):
        return default if (self.adapted and task.index == 0) else 0

    # ------------------------------------------------------------------ phase 1
    def features(self, trainable, frozen, batch) -> Array:
        """The (adapted) backbone's [CLS] token after the final LayerNorm (without a
        first-session module: the frozen query), each of which the loop may have
        precomputed."""
        if not self.adapted:
            return frozen_query(self.backbone, frozen, batch)
        return cached_fixed_features(
            batch, lambda: self.fixed_features(trainable, frozen, batch["inputs"]))

    def fixed_features(self, trainable, frozen, inputs) -> Array:
        """The first-session adapted feature, fixed after task 0."""
        return self.adapted.features(trainable, frozen, inputs)

    def loss(self, trainable, state, frozen, batch, rng, task: TaskSpec):
        return self.adapted.loss(self, trainable, frozen, batch, rng, task)

    # ------------------------------------------------------------------ phase 2
    def project(self, state, features: Array) -> Array:
        """``h = ReLU(f W_rand)`` (``f`` itself when ``M = 0``)."""
        if not self.config.M:
            return features
        return jax.nn.relu(_dot(features, state["w_rand"]))

    def after_task(self, task, trainable, state, frozen, data, rng):
        trainable = FirstSession.finish(trainable)  # phase 1 done: its classifier goes
        n = data.num_examples
        fit = fit_split(n, self.config.fit_fraction, rng)
        m, c = self.width, self.num_classes
        # host zeros: jnp.zeros would compile a program per shape
        zeros = lambda: {"G": np.zeros((m, m), np.float32), "Q": np.zeros((m, c), np.float32)}
        projection = {"w_rand": state["w_rand"]} if self.config.M else {}  # not G: 400 MB
        # padded to the run's largest task: one compiled pass serves every task
        in_fit = np.zeros(data.capacity, np.float32)
        in_fit[:n] = fit
        sums = data.reduce(self.accumulate, {"fit": zeros(), "val": zeros()}, trainable,
                           projection, frozen, jnp.asarray(in_fit), additive=True)
        # the solves run on one device: replicated, every device would repeat them
        sums, G, Q = data.on_one_device((sums, state["G"], state["Q"]))
        ridges = np.asarray(self.config.ridges, np.float32)
        errors = np.asarray(_validation_errors(sums["fit"], sums["val"],
                                               np.float32(n - fit.sum()), ridges))
        ridge = float(self.config.ridges[int(np.argmin(errors))])  # first minimum: smallest
        log.info("ranpac task %d: lambda %g (held-out MSE %.4g)", task.index, ridge,
                 float(np.min(errors)))
        G, Q, head = _add_task_and_solve(G, Q, sums, np.float32(ridge))
        ridge_log = np.asarray(state["ridge"]).copy()
        ridge_log[task.index] = ridge
        # on the host between tasks (G: 400 MB at M = 10,000); the steps read only the head
        # and W_rand (step_state), which the loop puts on the devices
        G, Q, head = jax.device_get((G, Q, head))
        return trainable, dict(state, G=G, Q=Q, head=head, ridge=ridge_log)

    def step_state(self, state):
        """What ``logits`` reads (the phase-1 loss reads none of the state): never ``G``."""
        return {key: state[key] for key in ("head", "w_rand") if key in state}

    def accumulate(self, carry, batch, trainable, projection, frozen, fit):
        """Adds a batch's ``h^T h`` and ``h^T y`` to the fit or the held-out sums (``fit``:
        per example, 1 in the fit split; a TaskData pass)."""
        h = self.project(projection, self.features(trainable, frozen, batch))
        y = jax.nn.one_hot(batch["label"], self.num_classes, dtype=h.dtype)
        in_fit = fit[jnp.minimum(batch["index"], fit.shape[0] - 1)] * batch["mask"]
        return {"fit": add_gram(carry["fit"], h, y, in_fit),
                "val": add_gram(carry["val"], h, y, batch["mask"] - in_fit)}

    def logits(self, trainable, state, frozen, batch, task):
        return _dot(self.project(state, self.features(trainable, frozen, batch)), state["head"])

    def count_trainable(self, trainable, state):
        """The adapted module (phase 1) plus the solved ``M x C`` head (not ``W_rand``, which
        is random, nor ``G``/``Q``, which are statistics)."""
        return count_params(trainable) + count_params(state["head"])
