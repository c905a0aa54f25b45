"""SSF: Scaling & Shifting your Features (Lian et al., 2022).

After each chosen operation the features are transformed as ``y = x * scale + shift``
(per channel). The backbone offers these points in every block: ``ln1, query, key, value,
out, ln2, fc1, fc2`` (``fc1`` has width ``mlp_dim``, the rest ``D``), and two outside the
blocks (``model_points``): ``embed``, the patch embedding, and ``final``, the final
LayerNorm's output -- the official SSF code (and APER's and RanPAC's copies of it) uses
all ten.

Trainable pytree: ``{layer: {point: {'scale': (d,), 'shift': (d,)}}}``, plus
``{'embed' | 'final': {'scale': (D,), 'shift': (D,)}}`` for the model-level points.

Initialisation: ``init='identity'`` (default) gives scale 1 / shift 0, so the model starts
exactly at the base model; ``init='paper'`` follows the official code, scale ~ N(1, 0.02^2),
shift ~ N(0, 0.02^2).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from pecft_jax.backbones.context import (MODEL_SSF_POINTS, SSF_POINTS, LayerPEFT, PEFTContext,
                                         layer_index, resolve_layers)
from pecft_jax.backbones.vit import ViTConfig

Array = jax.Array
SSF_INITS = ("identity", "paper")


@dataclasses.dataclass(frozen=True)
class SSFConfig:
    """SSF hyper-parameters: which points in the blocks, which blocks, which points outside
    them (``model_points``: ``'embed'``, ``'final'``), which init."""
    points: Union[str, Sequence[str]] = SSF_POINTS
    layers: Optional[Sequence[int]] = None
    init: str = "identity"
    model_points: Sequence[str] = ()

    def __post_init__(self):
        points = (self.points,) if isinstance(self.points, str) else tuple(self.points)
        unknown = [p for p in points if p not in SSF_POINTS]
        if unknown or not points:
            raise ValueError(f"SSF points must be a non-empty subset of {SSF_POINTS}, got "
                             f"{points}")
        object.__setattr__(self, "points", tuple(p for p in SSF_POINTS if p in points))
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            object.__setattr__(self, "layers", layers)
        model_points = ((self.model_points,) if isinstance(self.model_points, str)
                        else tuple(self.model_points))
        if any(p not in MODEL_SSF_POINTS for p in model_points):
            raise ValueError(f"SSF model_points must be a subset of {MODEL_SSF_POINTS}, got "
                             f"{model_points}")
        object.__setattr__(self, "model_points",
                           tuple(p for p in MODEL_SSF_POINTS if p in model_points))
        if self.init not in SSF_INITS:
            raise ValueError(f"SSF init must be one of {SSF_INITS}, got {self.init!r}")


def point_dim(cfg: ViTConfig, point: str) -> int:
    """Feature width at an SSF point."""
    if point not in SSF_POINTS:
        raise ValueError(f"unknown SSF point {point!r}; expected one of {SSF_POINTS}")
    return cfg.mlp_dim if point == "fc1" else cfg.hidden_size


def _scale_shift(dim: int, init: str, key: Array) -> dict:
    if init == "identity":
        return {"scale": jnp.ones((dim,), jnp.float32), "shift": jnp.zeros((dim,), jnp.float32)}
    k_scale, k_shift = jax.random.split(key)
    return {"scale": 1.0 + 0.02 * jax.random.normal(k_scale, (dim,), jnp.float32),
            "shift": 0.02 * jax.random.normal(k_shift, (dim,), jnp.float32)}


def init_ssf(cfg: ViTConfig, ssf_cfg: SSFConfig, rng: Array) -> dict:
    """Fresh SSF parameters ``{layer: {point: {'scale', 'shift'}}}`` (and ``{'embed' |
    'final': {'scale', 'shift'}}`` for ``model_points``)."""
    params = {}
    for layer in resolve_layers(ssf_cfg.layers, cfg.num_layers, "SSFConfig"):
        params[str(layer)] = {
            point: _scale_shift(point_dim(cfg, point), ssf_cfg.init, jax.random.fold_in(
                rng, layer * len(SSF_POINTS) + SSF_POINTS.index(point)))
            for point in ssf_cfg.points}
    for point in ssf_cfg.model_points:  # keys past every block's
        params[point] = _scale_shift(cfg.hidden_size, ssf_cfg.init, jax.random.fold_in(
            rng, cfg.num_layers * len(SSF_POINTS) + MODEL_SSF_POINTS.index(point)))
    return params


def ssf_context(ssf_params: Mapping, ssf_cfg: Optional[SSFConfig] = None) -> PEFTContext:
    """The backbone context for SSF parameters (``ssf_cfg`` carries nothing the context
    needs; accepted for symmetry with the other builders)."""
    del ssf_cfg
    layers, model = {}, {}
    for key, points in ssf_params.items():
        if key in MODEL_SSF_POINTS:
            model[key] = dict(points)
            continue
        layer = layer_index(key)
        for point, p in points.items():
            if point not in SSF_POINTS:
                raise ValueError(f"layer {layer}: unknown SSF point {point!r}; expected one of "
                                 f"{SSF_POINTS}")
            if set(p) != {"scale", "shift"} or p["scale"].shape != p["shift"].shape:
                raise ValueError(f"layer {layer}/{point}: SSF needs 'scale' and 'shift' of the "
                                 f"same shape (d,)")
        layers[layer] = LayerPEFT(ssf={point: dict(p) for point, p in points.items()})
    return PEFTContext(layers=layers, ssf=model or None)
