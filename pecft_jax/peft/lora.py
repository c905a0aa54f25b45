"""LoRA (Hu et al., 2021) for the ViT backbone, in HF peft's vocabulary.

A LoRA factor pair for a projection ``W: d_in -> d_out`` is ``A: (d_in, r)`` and
``B: (r, d_out)``; the projection becomes ``x @ W + scaling * x @ A @ B`` with
``scaling = lora_alpha / r``. ``B`` starts at zero so the adapted model starts equal to the
base model.

Trainable pytree (plain nested dicts)::

    {layer: {target: {'A': (d_in, r), 'B': (r, d_out)}}}

``layer`` is the 0-based block index (an ``int``; digit strings such as ``'3'`` are accepted
too, since checkpoint formats may turn dict keys into strings). ``target`` is one of
``query, key, value, out, fc1, fc2``; they live at these paths of the backbone's tree::

    query/key/value  .../MultiHeadDotProductAttention_1/{query,key,value}  kernel (D, H, hd)
    out              .../MultiHeadDotProductAttention_1/out                kernel (H, hd, D)
    fc1              .../MlpBlock_3/Dense_0                                kernel (D, mlp)
    fc2              .../MlpBlock_3/Dense_1                                kernel (mlp, D)

(``...`` = ``Transformer/encoderblock_N``).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from pecft_jax.backbones.context import (LORA_TARGETS, LayerPEFT, PEFTContext, layer_index,
                                         resolve_layers)
from pecft_jax.backbones.vit import ViTConfig
from pecft_jax.peft.per_task import init_per_task

Array = jax.Array

# Where each short target name lives inside ``Transformer/encoderblock_N``.
TARGET_SUBPATHS = {
    "query": ("MultiHeadDotProductAttention_1", "query"),
    "key": ("MultiHeadDotProductAttention_1", "key"),
    "value": ("MultiHeadDotProductAttention_1", "value"),
    "out": ("MultiHeadDotProductAttention_1", "out"),
    "fc1": ("MlpBlock_3", "Dense_0"),
    "fc2": ("MlpBlock_3", "Dense_1"),
}
LORA_INITS = ("kaiming_uniform", "gaussian")


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters (names as in HF peft).

    Attributes:
      r: rank of the update.
      lora_alpha: the update is scaled by ``lora_alpha / r``.
      lora_dropout: dropout on the LoRA branch's input (training only).
      target_modules: short names among ``query, key, value, out, fc1, fc2`` and/or regular
        expressions searched (``re.search``) in the full kernel path, e.g.
        ``'encoderblock_3/.*query'`` or ``'MlpBlock_3/Dense_[01]'``.
      layers: restrict to these block indices (None = every block).
      init: ``'kaiming_uniform'`` (HF's default: ``A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))``) or
        ``'gaussian'`` (HF's ``init_lora_weights='gaussian'``: ``A ~ N(0, 1/r^2)``).
        ``B`` is always zero.
    """
    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    target_modules: Union[str, Sequence[str]] = ("query", "value")
    layers: Optional[Sequence[int]] = None
    init: str = "kaiming_uniform"

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive int, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        targets = self.target_modules
        if isinstance(targets, str):
            targets = (targets,)
        targets = tuple(targets)
        if not targets:
            raise ValueError(f"target_modules is empty; name some of {LORA_TARGETS}")
        object.__setattr__(self, "target_modules", targets)
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            object.__setattr__(self, "layers", layers)
        if self.init not in LORA_INITS:
            raise ValueError(f"LoRA init must be one of {LORA_INITS}, got {self.init!r}")

    @property
    def scaling(self) -> float:
        return float(self.lora_alpha) / self.r


def target_path(layer: int, target: str) -> str:
    """The '/'-joined path of the module a LoRA target adapts (without '/kernel')."""
    return "/".join(("Transformer", f"encoderblock_{layer}") + TARGET_SUBPATHS[target])


def target_dims(cfg: ViTConfig, target: str) -> Tuple[int, int]:
    """(d_in, d_out) of the projection a target adapts, as the backbone feeds it to LoRA."""
    if target in ("query", "key", "value", "out"):
        return cfg.hidden_size, cfg.hidden_size
    if target == "fc1":
        return cfg.hidden_size, cfg.mlp_dim
    if target == "fc2":
        return cfg.mlp_dim, cfg.hidden_size
    raise ValueError(f"unknown LoRA target {target!r}; expected one of {LORA_TARGETS}")


def resolve_targets(cfg: ViTConfig, lora_cfg: LoraConfig) -> Dict[int, Tuple[str, ...]]:
    """Which (layer, target) pairs ``lora_cfg`` adapts: ``{layer: (targets...)}``."""
    allowed_layers = set(resolve_layers(lora_cfg.layers, cfg.num_layers, "LoraConfig"))
    every = [(layer, target) for layer in range(cfg.num_layers) for target in LORA_TARGETS]
    chosen = set()
    for entry in lora_cfg.target_modules:
        if entry in LORA_TARGETS:
            chosen.update((layer, t) for layer, t in every if t == entry)
            continue
        try:
            pattern = re.compile(entry)
        except re.error as err:
            raise ValueError(f"target_modules entry {entry!r} is neither a short name "
                             f"{LORA_TARGETS} nor a valid regular expression ({err})") from None
        matched = {(layer, t) for layer, t in every if pattern.search(target_path(layer, t))}
        if not matched:
            raise ValueError(
                f"target_modules entry {entry!r} matches no module of {cfg.name}. Valid short "
                f"names: {LORA_TARGETS}; or a regex searched in paths such as "
                f"{target_path(0, 'query')!r} or {target_path(0, 'fc1')!r}")
        chosen.update(matched)
    chosen = {(layer, t) for layer, t in chosen if layer in allowed_layers}
    if not chosen:
        raise ValueError(f"LoraConfig selects no module: target_modules="
                         f"{lora_cfg.target_modules} within layers={lora_cfg.layers}")
    resolved: Dict[int, Tuple[str, ...]] = {}
    for layer in sorted({layer for layer, _ in chosen}):
        resolved[layer] = tuple(t for t in LORA_TARGETS if (layer, t) in chosen)
    return resolved


# ----------------------------------------------------------------------------- init / context
def init_lora(cfg: ViTConfig, lora_cfg: LoraConfig, rng: Array) -> dict:
    """Fresh LoRA factors ``{layer: {target: {'A', 'B'}}}`` (B = 0: starts at the base model).

    Each factor's key is ``fold_in(rng, layer * 6 + target_index)``, so adding a target or a
    layer does not change the initial values of the others.
    """
    params: dict = {}
    for layer, targets in resolve_targets(cfg, lora_cfg).items():
        params[str(layer)] = {}
        for target in targets:
            d_in, d_out = target_dims(cfg, target)
            key = jax.random.fold_in(rng, layer * len(LORA_TARGETS) + LORA_TARGETS.index(target))
            if lora_cfg.init == "kaiming_uniform":
                # torch's kaiming_uniform_(a=sqrt(5)) on the (r, d_in) weight: bound 1/sqrt(d_in).
                bound = 1.0 / (d_in ** 0.5)
                a = jax.random.uniform(key, (d_in, lora_cfg.r), jnp.float32, -bound, bound)
            else:
                a = jax.random.normal(key, (d_in, lora_cfg.r), jnp.float32) / lora_cfg.r
            params[str(layer)][target] = {"A": a, "B": jnp.zeros((lora_cfg.r, d_out), jnp.float32)}
    return params


def _check_factors(layer: int, target: str, factors: Mapping[str, Any], r: int) -> None:
    if target not in LORA_TARGETS:
        raise ValueError(f"layer {layer}: unknown LoRA target {target!r}; expected one of "
                         f"{LORA_TARGETS}")
    if set(factors) != {"A", "B"}:
        raise ValueError(f"layer {layer}/{target}: LoRA factors must be {{'A', 'B'}}, got "
                         f"{sorted(factors)}")
    a_shape, b_shape = tuple(factors["A"].shape), tuple(factors["B"].shape)
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != r or b_shape[0] != r:
        raise ValueError(f"layer {layer}/{target}: expected A (d_in, r={r}) and B (r={r}, d_out), "
                         f"got A {a_shape} and B {b_shape}; does the LoraConfig match the params?")


def lora_context(lora_params: Mapping, lora_cfg: LoraConfig) -> PEFTContext:
    """The backbone context for ``lora_params`` (scaling and dropout from ``lora_cfg``)."""
    layers = {}
    for key, targets in lora_params.items():
        layer = layer_index(key)
        for target, factors in targets.items():
            _check_factors(layer, target, factors, lora_cfg.r)
        layers[layer] = LayerPEFT(lora={t: dict(f) for t, f in targets.items()},
                                  lora_scaling=lora_cfg.scaling,
                                  lora_dropout=lora_cfg.lora_dropout)
    return PEFTContext(layers=layers)


# ----------------------------------------------------------------------------- one LoRA per task
def init_task_loras(cfg: ViTConfig, lora_cfg: LoraConfig, num_tasks: int, rng: Array) -> dict:
    """One LoRA per task, stacked on a leading task axis: ``{layer: {target: {'A': (T, d_in,
    r), 'B': (T, r, d_out)}}}``, task ``t``'s factors drawn as :func:`init_lora` draws them
    from ``fold_in(rng, t)`` (every ``B`` zero: a LoRA not trained yet adds nothing). The
    shapes never change, so a step compiled once serves every task (the continual LoRA
    methods train slice ``t`` while task ``t`` runs)."""
    return init_per_task(lambda key: init_lora(cfg, lora_cfg, key), rng, num_tasks,
                         stacked=True)


def _check_task_factors(layer: int, target: str, a: Array, b: Array, r: int) -> None:
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != r or \
            b.shape[1] != r:
        raise ValueError(f"layer {layer}/{target}: task LoRAs must be A (T, d_in, r={r}) and "
                         f"B (T, r={r}, d_out), got {tuple(a.shape)} and {tuple(b.shape)}")


def task_lora_context(task_loras: Mapping, lora_cfg: LoraConfig,
                      weights: Optional[Mapping] = None) -> PEFTContext:
    """The backbone context that adds ``scaling * sum_t w_t x A_t B_t`` at every adapted
    projection: the task LoRAs concatenated along the rank (``(d_in, T r)`` by ``(T r,
    d_out)``), which is that sum exactly, in one branch. ``weights``, if given, is a tree
    like ``task_loras`` without the factor level -- ``{layer: {target: (T,)}}`` -- or a
    single ``(T,)`` array for all (SD-LoRA's magnitudes over norms, a 0/1 mask of the tasks
    that take part); by default every task counts once."""
    layers = {}
    for key, targets in task_loras.items():
        layer = layer_index(key)
        factors = {}
        for target, f in targets.items():
            a, b = f["A"], f["B"]
            _check_task_factors(layer, target, a, b, lora_cfg.r)
            if weights is not None:
                w = weights if not isinstance(weights, Mapping) else weights[key][target]
                b = b * jnp.asarray(w, b.dtype)[:, None, None]
            num_tasks, d_in, r = a.shape
            factors[target] = {"A": jnp.transpose(a, (1, 0, 2)).reshape(d_in, num_tasks * r),
                               "B": b.reshape(num_tasks * r, b.shape[2])}
        layers[layer] = LayerPEFT(lora=factors, lora_scaling=lora_cfg.scaling,
                                  lora_dropout=lora_cfg.lora_dropout)
    return PEFTContext(layers=layers)


def product_norms(task_loras: Mapping) -> dict:
    """``||A_t B_t||_F`` of every task's update at every adapted projection, ``{layer:
    {target: (T,)}}``, from the ``r x r`` Gram matrices: ``||A B||_F^2 = sum((A^T A) * (B
    B^T))`` -- no ``d_in x d_out`` product is formed."""
    def norm(f):
        gram_a = jnp.einsum("tir,tis->trs", f["A"], f["A"])
        gram_b = jnp.einsum("trj,tsj->trs", f["B"], f["B"])
        return jnp.sqrt(jnp.maximum(jnp.sum(gram_a * gram_b, axis=(1, 2)), 0.0))
    return {layer: {target: norm(f) for target, f in targets.items()}
            for layer, targets in task_loras.items()}


def task_slice(task_loras: Mapping, t) -> dict:
    """Task ``t``'s factors of stacked task LoRAs, still stacked (a task axis of 1): ``t``
    may be traced. With :func:`task_lora_context` it gives that task's branch alone."""
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, t, 1), task_loras)


def folds_exactly(compute_dtype: str) -> bool:
    """Whether a LoRA update folded into a kernel (:func:`fold_task_loras`) keeps float32
    precision in the backbone's matmuls: float32 compute, on XLA:CPU (whose float32 matmuls
    are float32) or with ``jax_default_matmul_precision`` 'highest' / 'float32'. A GPU's
    default TF32 (10-bit mantissa) or a TPU's bf16 passes would round the small update
    against the kernel's magnitude, where the separate branch keeps it to its own."""
    if compute_dtype != "float32":
        return False
    precision = str(jax.config.jax_default_matmul_precision or "").lower()
    return jax.default_backend() == "cpu" or precision in ("highest", "float32")


def fold_task_loras(params: Mapping, task_loras: Mapping, lora_cfg: LoraConfig,
                    weights: Optional[Union[Array, Mapping]] = None) -> dict:
    """``params`` with what ``task_lora_context(task_loras, lora_cfg, weights)`` adds at each
    adapted projection folded into its kernel: ``W + scaling * sum_t w_t A_t B_t``, formed in
    float32 at full precision. The backbone on the result, without that context, computes
    the same function up to float rounding, and its cost no longer grows with the number of
    tasks. Fold only where :func:`folds_exactly`. No dropout on the branch (there is none to
    apply to a folded weight)."""
    deltas = {}
    for key, targets in task_loras.items():
        deltas[key] = {}
        for target, f in targets.items():
            _check_task_factors(layer_index(key), target, f["A"], f["B"], lora_cfg.r)
            num_tasks = f["A"].shape[0]
            if weights is None:
                w = jnp.ones((num_tasks,), jnp.float32)
            else:
                w = weights if not isinstance(weights, Mapping) else weights[key][target]
            deltas[key][target] = lora_cfg.scaling * jnp.einsum(
                "t,tir,tro->io", jnp.asarray(w, jnp.float32), f["A"].astype(jnp.float32),
                f["B"].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return _add_to_kernels(params, deltas)


# ----------------------------------------------------------------------------- merge / unmerge
def _add_to_kernels(params: Mapping, deltas: Mapping) -> dict:
    """Copy-on-write update of the adapted kernels: ``W + delta`` for every ``{layer:
    {target: (d_in, d_out) delta}}``, computed in float32 and cast back to the kernel's
    dtype."""
    new = dict(params)
    if "Transformer" not in new:
        raise ValueError("params has no 'Transformer' subtree; pass the backbone's parameter "
                         "tree")
    new["Transformer"] = dict(new["Transformer"])
    for key, targets in deltas.items():
        layer = layer_index(key)
        block_name = f"encoderblock_{layer}"
        if block_name not in new["Transformer"]:
            raise ValueError(f"LoRA params name layer {layer}, but params has no "
                             f"Transformer/{block_name}")
        block = dict(new["Transformer"][block_name])
        for target, delta in targets.items():
            parent_name, module_name = TARGET_SUBPATHS[target]
            parent = dict(block[parent_name])
            module = dict(parent[module_name])
            kernel = module["kernel"]
            if delta.size != kernel.size:
                raise ValueError(f"{target_path(layer, target)}: LoRA update has shape "
                                 f"{delta.shape} but the kernel is {kernel.shape}")
            # The backbones flatten (H, hd) row-major on both sides, so a plain reshape lines
            # the (d_in, d_out) update up with the (D, H, hd) / (H, hd, D) kernels.
            merged = kernel.astype(jnp.float32) + delta.reshape(kernel.shape)
            module["kernel"] = merged.astype(kernel.dtype)
            parent[module_name] = module
            block[parent_name] = parent
        new["Transformer"][block_name] = block
    return new


def _fold(params: Mapping, lora_params: Mapping, lora_cfg: LoraConfig, sign: float) -> dict:
    """W + sign * scaling * A @ B at every adapted kernel."""
    deltas = {}
    for key, targets in lora_params.items():
        layer = layer_index(key)
        deltas[key] = {}
        for target, factors in targets.items():
            _check_factors(layer, target, factors, lora_cfg.r)
            deltas[key][target] = sign * lora_cfg.scaling * (
                factors["A"].astype(jnp.float32) @ factors["B"].astype(jnp.float32))
    return _add_to_kernels(params, deltas)


def merge_lora(frozen_params: Mapping, lora_params: Mapping, lora_cfg: LoraConfig) -> dict:
    """A new params tree with ``scaling * A @ B`` folded into the adapted kernels.

    The input tree is not modified; untouched leaves are shared. Running the backbone on the
    result without a LoRA context equals running it on ``frozen_params`` with
    ``lora_context(lora_params, lora_cfg)`` (dropout aside).
    """
    return _fold(frozen_params, lora_params, lora_cfg, 1.0)


def unmerge_lora(merged_params: Mapping, lora_params: Mapping, lora_cfg: LoraConfig) -> dict:
    """Inverse of :func:`merge_lora` (subtracts the same update; exact up to float rounding)."""
    return _fold(merged_params, lora_params, lora_cfg, -1.0)
