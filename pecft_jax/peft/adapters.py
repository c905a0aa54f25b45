"""Bottleneck adapters: sequential (Houlsby et al., 2019 / Pfeiffer) and parallel
(AdaptFormer, Chen et al., 2022).

An adapter is ``up(relu(down(h)))`` scaled by ``scale`` and added to the residual branch:

* ``mode='sequential'``: after the MLP, ``h + scale * up(relu(down(h)))`` where ``h`` is the
  MLP output; with ``attn=True`` an adapter at the attention too (``attn_mode``: on its
  output, sequentially, by default).
* ``mode='parallel'`` (AdaptFormer): beside the MLP, ``mlp(x) + scale * up(relu(down(x)))``
  where ``x`` is the block's residual stream; AdaptFormer uses ``scale=0.1``.
* ``attn_mode='parallel'`` (LAE's adapter, with ``mlp=False``): beside the attention,
  ``attn(LN(x)) + scale * up(act(down(LN(x))))`` from the attention's own input.

``activation`` is ReLU (Houlsby, AdaptFormer) or the exact GELU (LAE).

Trainable pytree::

    {layer: {'mlp': {'down': {'kernel': (D, b), 'bias': (b,)},
                     'up':   {'kernel': (b, D), 'bias': (D,)}},
             'attn': {...same...}}}          # 'attn' only with AdapterConfig(attn=True)

``up`` starts at zero, so the adapted model starts equal to the base model.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from pecft_jax.backbones.context import (ADAPTER_ACTIVATIONS, LayerPEFT, PEFTContext,
                                         layer_index, resolve_layers)
from pecft_jax.backbones.vit import ViTConfig

Array = jax.Array
ADAPTER_MODES = ("sequential", "parallel")
ADAPTER_INITS = ("kaiming_uniform", "normal")
ADAPTER_SITES = ("mlp", "attn")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Bottleneck adapter hyper-parameters.

    Attributes:
      bottleneck_dim: width ``b`` of the bottleneck.
      mode: ``'sequential'`` or ``'parallel'`` (AdaptFormer).
      scale: multiplier of the adapter branch (AdaptFormer's default is 0.1).
      attn: also put an adapter at the attention (wired by ``attn_mode``).
      layers: block indices that get adapters (None = all).
      init: initialisation of ``down``: ``'kaiming_uniform'`` (AdaptFormer's choice,
        ``U(-1/sqrt(D), 1/sqrt(D))``) or ``'normal'`` (``N(0, init_std^2)``, Houlsby's
        near-identity init). ``up`` and the biases are always zero.
      init_std: standard deviation for ``init='normal'``.
      dropout: dropout on the bottleneck activations while training (AdaptFormer: 0.1).
      mlp: put an adapter at the MLP (the usual site; False for LAE's attention-only one).
      attn_mode: the attention adapter's wiring, ``'sequential'`` (on the attention
        output) or ``'parallel'`` (from the attention's input, beside it).
      activation: ``'relu'`` or ``'gelu'`` (exact) inside the bottleneck.
    """
    bottleneck_dim: int
    mode: str = "sequential"
    scale: float = 1.0
    attn: bool = False
    layers: Optional[Sequence[int]] = None
    init: str = "kaiming_uniform"
    init_std: float = 1e-2
    dropout: float = 0.0
    mlp: bool = True
    attn_mode: str = "sequential"
    activation: str = "relu"

    def __post_init__(self):
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.bottleneck_dim, int) or self.bottleneck_dim <= 0:
            raise ValueError(f"bottleneck_dim must be a positive int, got {self.bottleneck_dim!r}")
        if self.mode not in ADAPTER_MODES:
            raise ValueError(f"adapter mode must be one of {ADAPTER_MODES}, got {self.mode!r}")
        if self.init not in ADAPTER_INITS:
            raise ValueError(f"adapter init must be one of {ADAPTER_INITS}, got {self.init!r}")
        if self.attn_mode not in ADAPTER_MODES:
            raise ValueError(f"adapter attn_mode must be one of {ADAPTER_MODES}, got "
                             f"{self.attn_mode!r}")
        if self.activation not in ADAPTER_ACTIVATIONS:
            raise ValueError(f"adapter activation must be one of {ADAPTER_ACTIVATIONS}, got "
                             f"{self.activation!r}")
        if not (self.mlp or self.attn):
            raise ValueError("an adapter needs a site: set mlp=True and/or attn=True")


def _init_bottleneck(key: Array, dim: int, bottleneck: int, adapter_cfg: AdapterConfig) -> dict:
    if adapter_cfg.init == "kaiming_uniform":
        bound = 1.0 / (dim ** 0.5)
        down = jax.random.uniform(key, (dim, bottleneck), jnp.float32, -bound, bound)
    else:
        down = adapter_cfg.init_std * jax.random.normal(key, (dim, bottleneck), jnp.float32)
    return {"down": {"kernel": down, "bias": jnp.zeros((bottleneck,), jnp.float32)},
            "up": {"kernel": jnp.zeros((bottleneck, dim), jnp.float32),
                   "bias": jnp.zeros((dim,), jnp.float32)}}


def init_adapters(cfg: ViTConfig, adapter_cfg: AdapterConfig, rng: Array) -> dict:
    """Fresh adapters ``{layer: {'mlp': ..., ['attn': ...]}}`` (identity at start)."""
    params = {}
    for layer in resolve_layers(adapter_cfg.layers, cfg.num_layers, "AdapterConfig"):
        sites = (("mlp",) if adapter_cfg.mlp else ()) + (("attn",) if adapter_cfg.attn else ())
        params[str(layer)] = {
            site: _init_bottleneck(jax.random.fold_in(rng, 2 * layer + ADAPTER_SITES.index(site)),
                                   cfg.hidden_size, adapter_cfg.bottleneck_dim, adapter_cfg)
            for site in sites}
    return params


def _check_bottleneck(layer: int, site: str, params: Mapping) -> None:
    try:
        down, up = params["down"]["kernel"], params["up"]["kernel"]
        params["down"]["bias"], params["up"]["bias"]
    except (KeyError, TypeError):
        raise ValueError(f"layer {layer}/{site}: an adapter needs {{'down': {{'kernel', 'bias'}}, "
                         f"'up': {{'kernel', 'bias'}}}}") from None
    if (down.ndim != 2 or up.ndim != 2 or down.shape[1] != up.shape[0]
            or down.shape[0] != up.shape[1]):
        raise ValueError(f"layer {layer}/{site}: expected down (D, b) and up (b, D), got "
                         f"{tuple(down.shape)} and {tuple(up.shape)}")


def adapter_context(adapter_params: Mapping, adapter_cfg: AdapterConfig) -> PEFTContext:
    """The backbone context for ``adapter_params`` (mode and scale from ``adapter_cfg``)."""
    layers = {}
    for key, sites in adapter_params.items():
        layer = layer_index(key)
        unknown = set(sites) - set(ADAPTER_SITES)
        if unknown or "mlp" not in sites and "attn" not in sites:
            raise ValueError(f"layer {layer}: adapter sites must be among {ADAPTER_SITES}, got "
                             f"{sorted(sites)}")
        for site, params in sites.items():
            _check_bottleneck(layer, site, params)
        layers[layer] = LayerPEFT(adapter=sites.get("mlp"), adapter_attn=sites.get("attn"),
                                  adapter_mode=adapter_cfg.mode,
                                  adapter_attn_mode=adapter_cfg.attn_mode,
                                  adapter_activation=adapter_cfg.activation,
                                  adapter_scale=adapter_cfg.scale,
                                  adapter_dropout=adapter_cfg.dropout)
    return PEFTContext(layers=layers)
