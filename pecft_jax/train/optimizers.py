"""Optimizers of the official codes that optax has no exact twin for.

``transformers_adamw``: the ``AdamW`` class of Hugging Face ``transformers`` 4.x
(``transformers/optimization.py``, deprecated since), which NLP continual-learning codes
import -- Progressive Prompts' BERT code among them. Against optax's (and PyTorch's) AdamW it
differs in two places, both exact here:

* epsilon is added to the root of the *uncorrected* second moment and the bias corrections
  scale the step: ``p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``, an
  effective epsilon of ``eps / sqrt(1 - b2^t)`` against optax's ``eps`` (3.2e-5 instead of
  1e-6 at the first step);
* weight decay multiplies the parameters *after* the Adam step:
  ``p <- p * (1 - lr * wd)``, where optax decays the parameters before it (a second-order
  difference, ``lr^2 wd`` times the step).

Its moments sit in an ``optax.ScaleByAdamState`` and its learning-rate step count in an
``optax.ScaleByScheduleState``, as optax's AdamW keeps them, so whatever reads or sets
those counts (``partition.continue_counts``) treats both optimizers alike.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import optax

Schedule = Union[float, Callable[[Any], Any]]


def scale_by_transformers_adam(b1: float = 0.9, b2: float = 0.999,
                               eps: float = 1e-6) -> optax.GradientTransformation:
    """The direction of ``transformers.AdamW``'s step (before the learning rate):
    ``sqrt(1 - b2^t) / (1 - b1^t) * m_t / (sqrt(v_t) + eps)``."""

    def init(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros,
                                      nu=jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
        nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.nu, updates)
        count = optax.safe_increment(state.count)
        # 1 - b^t as expm1: float32's 0.999 ** t would be 1e-5 off where torch takes the
        # bias corrections in double precision
        t = count.astype(jnp.float32)
        step_size = (jnp.sqrt(-jnp.expm1(t * math.log(b2)))
                     / -jnp.expm1(t * math.log(b1)))
        direction = jax.tree_util.tree_map(lambda m, v: step_size * m / (jnp.sqrt(v) + eps),
                                           mu, nu)
        return direction, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def step_then_decay(learning_rate: Schedule,
                    weight_decay: float = 0.0) -> optax.GradientTransformation:
    """``p <- (p - lr * d) * (1 - lr * wd)`` for the direction ``d`` it receives:
    ``transformers.AdamW``'s step, then its decay of the stepped parameters."""

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        steps = jax.tree_util.tree_map(lambda d: -lr * d, updates)
        if weight_decay:
            if params is None:
                raise ValueError("transformers_adamw with weight_decay needs the parameters: "
                                 "call update(grads, state, params)")
            steps = jax.tree_util.tree_map(lambda s, p: s - lr * weight_decay * (p + s),
                                           steps, params)
        return steps, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def transformers_adamw(learning_rate: Schedule, b1: float = 0.9, b2: float = 0.999,
                       eps: float = 1e-6, weight_decay: float = 0.0
                       ) -> optax.GradientTransformation:
    """``transformers.AdamW(params, lr, betas=(b1, b2), eps, weight_decay)`` with its default
    ``correct_bias=True`` (epsilon 1e-6 is its default too), the rate from ``learning_rate``
    at each update (a ``LambdaLR`` stepped after every optimizer step)."""
    return optax.chain(scale_by_transformers_adam(b1, b2, eps),
                       step_then_decay(learning_rate, weight_decay))
