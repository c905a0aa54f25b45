"""Prompt tuning (VPT, Jia et al., 2022) and prefix tuning (Li & Liang, 2021; as DualPrompt
and CODA-Prompt use it).

Prompt tuning inserts learnable tokens after [CLS]:

* shallow (``deep=False``): one prompt of ``length`` tokens before block 0;
* deep (``deep=True``): a prompt before each chosen block. ``mode='replace'`` is VPT-deep
  (each layer's prompt overwrites the prompt tokens the previous blocks produced);
  ``mode='append'`` keeps them and puts the new ones in front.

Trainable pytree (layer keys are strings, e.g. "0"): ``{layer: (length, D)}``.

Prefix tuning leaves the sequence alone and concatenates ``length`` learnable keys and
values to the projected keys/values of each chosen block's attention.
Trainable pytree (layer keys are strings, e.g. "0"): ``{layer: (2, length, D)}`` -- index 0
is the key half, 1 the value half.

Both context builders also take per-example arrays (``(B, length, D)`` prompts,
``(B, 2, length, D)`` prefixes), which is what prompt-pool methods produce after selecting
prompts per example; the token count there may differ from ``cfg.length`` (e.g. ``k*L`` after
gathering ``k`` pool entries).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from pecft_jax.backbones.context import (LayerPEFT, PEFTContext, layer_index,
                                         resolve_layers)
from pecft_jax.backbones.vit import ViTConfig

Array = jax.Array
PROMPT_MODES = ("replace", "append")
PROMPT_INITS = ("vpt", "uniform", "normal", "zeros", "small_uniform")


def _sample(kind: str, key: Array, shape: tuple, cfg: ViTConfig) -> Array:
    """Prompt initialisers used by the papers.

    * ``'vpt'``: VPT's "xavier uniform" ``U(-v, v)``, ``v = sqrt(6 / (C*p*p + D))`` with C
      input channels and patch size p (VPT writes C=3 for RGB).
    * ``'uniform'``: ``U(-1, 1)``, DualPrompt's and L2P-PyTorch's ``prompt_init='uniform'``.
    * ``'normal'``: ``N(0, 0.02^2)``, the ViT embedding scale.
    * ``'zeros'``.
    * ``'small_uniform'``: ``U[0, 0.01)``, the official L2P (JAX) prompts and LAE's prefixes.
    """
    if kind == "vpt":
        bound = math.sqrt(6.0 / (cfg.num_channels * cfg.patch_size ** 2 + cfg.hidden_size))
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    if kind == "uniform":
        return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)
    if kind == "normal":
        return 0.02 * jax.random.normal(key, shape, jnp.float32)
    if kind == "zeros":
        return jnp.zeros(shape, jnp.float32)
    if kind == "small_uniform":
        return jax.random.uniform(key, shape, jnp.float32, 0.0, 0.01)
    raise ValueError(f"prompt init must be one of {PROMPT_INITS}, got {kind!r}")


def _check_length(length) -> None:
    if not isinstance(length, int) or length <= 0:
        raise ValueError(f"prompt length must be a positive int, got {length!r}")


# ----------------------------------------------------------------------------- prompt tuning
@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """Prompt-tuning hyper-parameters.

    Attributes:
      length: prompt tokens per layer.
      deep: False = shallow (layer 0 only), True = a prompt before each of ``layers``.
      mode: ``'replace'`` (VPT-deep) or ``'append'`` for deep prompts (irrelevant for shallow).
      layers: blocks that get a prompt when ``deep`` (None = all); shallow accepts only
        None or ``(0,)``.
      init: ``'vpt'`` (default), ``'uniform'``, ``'normal'`` or ``'zeros'`` (see ``_sample``).
    """
    length: int
    deep: bool = False
    mode: str = "replace"
    layers: Optional[Sequence[int]] = None
    init: str = "vpt"

    def __post_init__(self):
        _check_length(self.length)
        if self.mode not in PROMPT_MODES:
            raise ValueError(f"prompt mode must be one of {PROMPT_MODES}, got {self.mode!r}")
        if self.init not in PROMPT_INITS:
            raise ValueError(f"prompt init must be one of {PROMPT_INITS}, got {self.init!r}")
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            object.__setattr__(self, "layers", layers)
            if not self.deep and tuple(layers) != (0,):
                raise ValueError(f"shallow prompt tuning inserts before block 0 only, got "
                                 f"layers={layers}; set deep=True to prompt other blocks")


def init_prompts(cfg: ViTConfig, prompt_cfg: PromptConfig, rng: Array) -> dict:
    """Fresh prompts ``{layer: (length, D)}``."""
    layers = (resolve_layers(prompt_cfg.layers, cfg.num_layers, "PromptConfig")
              if prompt_cfg.deep else (0,))
    return {str(layer): _sample(prompt_cfg.init, jax.random.fold_in(rng, layer),
                           (prompt_cfg.length, cfg.hidden_size), cfg)
            for layer in layers}


def prompt_context(prompts: Mapping, prompt_cfg: PromptConfig) -> PEFTContext:
    """The backbone context for ``{layer: (Lp, D) or (B, Lp, D)}`` prompts."""
    layers = {}
    for key, tokens in prompts.items():
        layer = layer_index(key)
        if tokens.ndim not in (2, 3):
            raise ValueError(f"layer {layer}: prompts must be (Lp, D) or (B, Lp, D), got "
                             f"{tuple(tokens.shape)}")
        layers[layer] = LayerPEFT(prompt=tokens, prompt_mode=prompt_cfg.mode)
    return PEFTContext(layers=layers)


# ----------------------------------------------------------------------------- prefix tuning
@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    """Prefix-tuning hyper-parameters.

    Attributes:
      length: prefix tokens per key/value half (the stored array is ``(2, length, D)``).
      layers: blocks that get a prefix (None = all). DualPrompt puts its G-prompt at
        blocks 0-1 and its E-prompt at 2-4.
      init: ``'uniform'`` (DualPrompt's ``U(-1, 1)``, default), ``'vpt'``, ``'normal'``,
        ``'zeros'`` or ``'small_uniform'`` (LAE's ``U[0, 0.01)``).
      compensated: LAE's attention compensation (the prefix columns divided by their sum).
    """
    length: int
    layers: Optional[Sequence[int]] = None
    init: str = "uniform"
    compensated: bool = False

    def __post_init__(self):
        _check_length(self.length)
        if self.init not in PROMPT_INITS:
            raise ValueError(f"prefix init must be one of {PROMPT_INITS}, got {self.init!r}")
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            object.__setattr__(self, "layers", layers)


def init_prefixes(cfg: ViTConfig, prefix_cfg: PrefixConfig, rng: Array) -> dict:
    """Fresh prefixes ``{layer: (2, length, D)}`` (key half, value half)."""
    return {str(layer): _sample(prefix_cfg.init, jax.random.fold_in(rng, layer),
                           (2, prefix_cfg.length, cfg.hidden_size), cfg)
            for layer in resolve_layers(prefix_cfg.layers, cfg.num_layers, "PrefixConfig")}


def split_prefix(prefix: Array) -> tuple:
    """``(..., 2, Lp, D)`` -> (key ``(..., Lp, D)``, value ``(..., Lp, D)``)."""
    if prefix.ndim not in (3, 4) or prefix.shape[-3] != 2:
        raise ValueError(f"a prefix must be (2, Lp, D) or (B, 2, Lp, D) (key half, value half), "
                         f"got {tuple(prefix.shape)}")
    return prefix[..., 0, :, :], prefix[..., 1, :, :]


def prefix_context(prefixes: Mapping, prefix_cfg: Optional[PrefixConfig] = None) -> PEFTContext:
    """The backbone context for ``{layer: (2, Lp, D) or (B, 2, Lp, D)}`` prefixes
    (``prefix_cfg.compensated``: LAE's attention compensation)."""
    compensated = bool(prefix_cfg.compensated) if prefix_cfg is not None else False
    layers = {}
    for key, prefix in prefixes.items():
        layer = layer_index(key)
        prefix_key, prefix_value = split_prefix(prefix)
        layers[layer] = LayerPEFT(prefix_key=prefix_key, prefix_value=prefix_value,
                                  prefix_compensated=compensated)
    return PEFTContext(layers=layers)
