"""``jax.jit`` with the XLA options pecft_jax's programs compile with, and the bound on how
many of them may be queued on XLA:CPU (:func:`bound_queue`).

One option today, measured on this project's 2-core AMD EPYC VM (jaxlib 0.10.2, XLA:CPU,
ViT-Demo/7 batch 64, each method's demo step, alternating processes, medians of 3): XLA:CPU
hands reductions (LayerNorm's and softmax's means and sums, and their gradients) to YNNPACK
by default, which made CODA-Prompt's step 1.14x and S-Prompts' 1.12x slower than XLA's own
fused loops; L2P, DualPrompt, HiDe-Prompt and full fine-tuning did not change beyond the
noise. So YNNPACK fusions are switched off (``xla_cpu_experimental_ynn_fusion_type=''``).
The option only touches XLA:CPU's code generation (every XLA backend reads the same
DebugOptions, where it is an unused field for GPUs -- not tried on a TPU), and it changes
the order of float additions in those reductions, not what is computed. Programs that run
once a run (random initialisation) and eager operations compile without it.

The option is passed per program (``jax.jit(..., compiler_options=...)``), so it applies
whenever a program compiles -- in a script, a test or a notebook whose backend is already
running -- without changing the process's environment. It is left out:

* on a jaxlib outside 0.10.x (:data:`TESTED_JAXLIB`; measured on 0.10.2): an XLA that has
  renamed or removed an experimental option refuses to compile with it;
* where the user's ``XLA_FLAGS`` already sets it: theirs wins.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jaxlib

YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"
TESTED_JAXLIB: Tuple[Tuple[int, ...], Tuple[int, ...]] = ((0, 10), (0, 11))  # [lo, hi)


def _version(text: str) -> Tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def compiler_options(jaxlib_version: Optional[str] = None,
                     xla_flags: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The options for this process's jaxlib and ``XLA_FLAGS`` (arguments: for tests)."""
    version = _version(jaxlib_version if jaxlib_version is not None else jaxlib.__version__)
    flags = xla_flags if xla_flags is not None else os.environ.get("XLA_FLAGS", "")
    low, high = TESTED_JAXLIB
    if not low <= version < high or YNN_FUSIONS in flags:
        return None
    return {YNN_FUSIONS: ""}


def jit(fn: Callable, **kwargs) -> Callable:
    """``jax.jit(fn, **kwargs)`` compiled with :func:`compiler_options`."""
    options = compiler_options()
    return jax.jit(fn, compiler_options=options, **kwargs) if options else jax.jit(fn, **kwargs)


# XLA:CPU can deadlock when data-parallel programs queue up on a host split into devices
# (jaxlib 0.10.2; experiments/queue_deadlock_probe.py, a standalone script, not pecft_jax's
# programs): a chained gradient step (a 24-layer MLP of width 128, batch 64, two host
# devices) dispatched 300 times hung in an all-reduce's rendezvous whenever it never waited
# or waited every 40 steps, and finished whenever it waited every 30, 20 or 16 (README,
# "Speed", gives the runs). The loop waits every ``train.log_every_steps`` (20 by default)
# and was never seen more than 8 steps ahead, but how far it gets ahead depends on timings.
MAX_QUEUED_PROGRAMS = 16


def bound_queue(count: int, output: Any) -> None:
    """Waits for ``output`` -- of the ``count``-th program of a chain, each taking the
    previous one's result and holding a collective -- every :data:`MAX_QUEUED_PROGRAMS`-th
    program when it lives on CPU devices, so that no more than that many are ever queued
    there. The deadlock is XLA:CPU's: on an accelerator nothing waits."""
    if count % MAX_QUEUED_PROGRAMS:
        return
    leaf = jax.tree_util.tree_leaves(output)[0]
    if any(device.platform == "cpu" for device in leaf.sharding.device_set):
        jax.block_until_ready(output)
