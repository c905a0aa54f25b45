"""The PEFT context: what a method hands the backbone for one forward pass.

This is the backbone's hook schema, so it lives with the backbone: ``pecft_jax.peft``
builds contexts from trainable pytrees and imports this module, the backbone consumes them,
and nothing under ``backbones/`` imports ``peft``.

The backbone knows *where* parameter-efficient pieces plug in (which layer, which
projection); the context says *what* is plugged in. Methods build a context inside their
jit-compiled functions from their trainable pytree, so every array in it receives
gradients through the backbone's forward.

A context is a pytree (``flax.struct.dataclass``): arrays are leaves, options that change
the traced program (modes, scales) are static fields.

Layer ``l`` of a ``PEFTContext`` describes the insertions at transformer block ``l``:

* ``prompt``      -- tokens ``(B, Lp, D)`` or ``(Lp, D)`` put into the sequence right
                     before block ``l`` runs, after the [CLS] token. At ``l == 0`` this is
                     shallow prompt tuning / L2P's input prompts; at later layers it is a
                     deep prompt. ``prompt_mode='append'`` inserts them in front of the
                     existing prompt tokens; ``'replace'`` overwrites the prompt tokens the
                     previous layers produced (VPT-deep), which needs equal lengths.
* ``prompt_mask``  -- (text backbones) ``(Lp,)`` or ``(B, Lp)``, 1 where a prompt token
                     may be attended to, 0 where it is inert: its key column gets the
                     padding mask, so the other tokens' outputs are exactly those without
                     it (fixed-size prompt arrays whose unused entries are switched off,
                     e.g. Progressive Prompts' later tasks). Default: all 1.
* ``prefix_key`` / ``prefix_value`` -- ``(B, Lp, D)`` or ``(Lp, D)`` concatenated to the
                     *projected* keys and values of block ``l``'s attention (prefix tuning
                     as DualPrompt and CODA-Prompt use it: a prompt of length 2*Lp split
                     into a key half and a value half). They change no sequence length.
                     ``prefix_compensated`` (LAE) divides the prefix columns of the
                     attention by their sum ``lambda``: ``(1 - lambda) Attn(x) +
                     Attn_prefix(x)``.
* ``lora``        -- ``{target: {'A': (d_in, r), 'B': (r, d_out)}}`` for targets among
                     ``query, key, value, out, fc1, fc2``; adds ``scaling * x @ A @ B``.
* ``adapter``     -- ``{'down': {'kernel','bias'}, 'up': {'kernel','bias'}}`` bottleneck.
                     ``adapter_mode='sequential'`` applies ``h + s*up(relu(down(h)))`` to
                     the MLP output; ``'parallel'`` (AdaptFormer) adds ``s*up(relu(down(x)))``
                     of the block's residual stream beside the MLP. ``adapter_dropout``
                     drops bottleneck activations while training (AdaptFormer's 0.1);
                     ``adapter_activation`` is ``'relu'`` or ``'gelu'`` (LAE).
* ``adapter_attn``-- the same at the attention: ``adapter_attn_mode='sequential'`` on the
                     attention output, ``'parallel'`` (LAE) from the attention's input (the
                     LayerNorm output) and added beside it.
* ``ssf``         -- ``{point: {'scale': (d,), 'shift': (d,)}}`` scale-and-shift after
                     ``ln1, query, key, value, out, ln2, fc1, fc2``.

Outside the blocks, ``PEFTContext.ssf`` scales and shifts the patch embedding (``'embed'``,
after the patch projection, before [CLS] and the position embedding) and the final
LayerNorm's output (``'final'``, every token), the two points the SSF paper adds there.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

LORA_TARGETS = ("query", "key", "value", "out", "fc1", "fc2")
ADAPTER_ACTIVATIONS = ("relu", "gelu")
SSF_POINTS = ("ln1", "query", "key", "value", "out", "ln2", "fc1", "fc2")
MODEL_SSF_POINTS = ("embed", "final")  # outside the blocks (PEFTContext.ssf)


@flax.struct.dataclass
class LayerPEFT:
    prompt: Optional[Array] = None
    prompt_mask: Optional[Array] = None
    prefix_key: Optional[Array] = None
    prefix_value: Optional[Array] = None
    lora: Optional[Mapping[str, Mapping[str, Array]]] = None
    adapter: Optional[Mapping[str, Any]] = None
    adapter_attn: Optional[Mapping[str, Any]] = None
    ssf: Optional[Mapping[str, Mapping[str, Array]]] = None
    prompt_mode: str = flax.struct.field(pytree_node=False, default="append")
    lora_scaling: float = flax.struct.field(pytree_node=False, default=1.0)
    lora_dropout: float = flax.struct.field(pytree_node=False, default=0.0)
    adapter_mode: str = flax.struct.field(pytree_node=False, default="sequential")
    adapter_scale: float = flax.struct.field(pytree_node=False, default=1.0)
    adapter_dropout: float = flax.struct.field(pytree_node=False, default=0.0)
    adapter_activation: str = flax.struct.field(pytree_node=False, default="relu")
    adapter_attn_mode: str = flax.struct.field(pytree_node=False, default="sequential")
    prefix_compensated: bool = flax.struct.field(pytree_node=False, default=False)

    def __post_init__(self):
        if self.prompt_mode not in ("append", "replace"):
            raise ValueError(f"prompt_mode must be 'append' or 'replace', got {self.prompt_mode!r}")
        for name in ("adapter_mode", "adapter_attn_mode"):
            if getattr(self, name) not in ("sequential", "parallel"):
                raise ValueError(f"{name} must be 'sequential' or 'parallel', got "
                                 f"{getattr(self, name)!r}")
        if self.adapter_activation not in ADAPTER_ACTIVATIONS:
            raise ValueError(f"adapter_activation must be one of {ADAPTER_ACTIVATIONS}, got "
                             f"{self.adapter_activation!r}")
        if self.prompt_mask is not None and self.prompt is None:
            raise ValueError("prompt_mask is given without a prompt")
        if (self.prefix_key is None) != (self.prefix_value is None):
            raise ValueError("prefix_key and prefix_value must be given together")
        for target in (self.lora or {}):
            if target not in LORA_TARGETS:
                raise ValueError(f"unknown LoRA target {target!r}; expected one of {LORA_TARGETS}")
        for point in (self.ssf or {}):
            if point not in SSF_POINTS:
                raise ValueError(f"unknown SSF point {point!r}; expected one of {SSF_POINTS}")


# Static options of LayerPEFT and the array fields they configure.
_OPTIONS_OF = {"prompt": ("prompt_mode",), "lora": ("lora_scaling", "lora_dropout"),
               "prefix_key": ("prefix_compensated",),
               "adapter": ("adapter_mode", "adapter_scale", "adapter_dropout",
                           "adapter_activation"),
               "adapter_attn": ("adapter_attn_mode", "adapter_scale", "adapter_dropout",
                                "adapter_activation")}
_FIELDS_OF = {"prompt_mode": ("prompt",), "lora_scaling": ("lora",), "lora_dropout": ("lora",),
              "prefix_compensated": ("prefix_key",),
              "adapter_mode": ("adapter",), "adapter_attn_mode": ("adapter_attn",),
              "adapter_scale": ("adapter", "adapter_attn"),
              "adapter_dropout": ("adapter", "adapter_attn"),
              "adapter_activation": ("adapter", "adapter_attn")}


@flax.struct.dataclass
class PEFTContext:
    """Per-layer insertions, keyed by block index (0-based), and the model-level SSF points
    (``ssf``: ``{'embed' | 'final': {'scale', 'shift'}}``)."""
    layers: Mapping[int, LayerPEFT] = flax.struct.field(default_factory=dict)
    ssf: Optional[Mapping[str, Mapping[str, Array]]] = None

    def __post_init__(self):
        for point in (self.ssf or {}):
            if point not in MODEL_SSF_POINTS:
                raise ValueError(f"unknown model-level SSF point {point!r}; expected one of "
                                 f"{MODEL_SSF_POINTS}")

    def at(self, layer: int) -> Optional[LayerPEFT]:
        return self.layers.get(layer)

    def merge(self, other: "PEFTContext") -> "PEFTContext":
        """Combine two contexts (e.g. a G-prompt and an E-prompt); layers must not overlap
        in the same field."""
        if self.ssf and other.ssf:
            raise ValueError("both contexts set model-level SSF points")
        merged = dict(self.layers)
        for layer, lp in other.layers.items():
            if layer not in merged:
                merged[layer] = lp
                continue
            mine = merged[layer]
            updates = {}
            for field in ("prompt", "prefix_key", "prefix_value", "lora", "adapter",
                          "adapter_attn", "ssf"):
                theirs = getattr(lp, field)
                if theirs is None:
                    continue
                if getattr(mine, field) is not None:
                    raise ValueError(f"both contexts set {field!r} at layer {layer}")
                updates[field] = theirs
                # The static options that go with a field travel with it (else e.g. a LoRA
                # merged onto a prompt layer would silently fall back to lora_scaling=1).
                for option in _OPTIONS_OF.get(field, ()):
                    value = getattr(lp, option)
                    if any(getattr(mine, f) is not None for f in _FIELDS_OF[option]) and \
                            getattr(mine, option) != value:
                        raise ValueError(f"layer {layer}: the contexts disagree on {option!r} "
                                         f"({getattr(mine, option)!r} vs {value!r})")
                    updates[option] = value
            merged[layer] = mine.replace(**updates)
        return PEFTContext(layers=merged, ssf=self.ssf or other.ssf)


def as_batched(tokens: Array, batch: int) -> Array:
    """(Lp, D) -> (B, Lp, D); (B, Lp, D) passes through (checked)."""
    if tokens.ndim == 2:
        return jnp.broadcast_to(tokens[None], (batch,) + tokens.shape)
    if tokens.ndim != 3 or tokens.shape[0] != batch:
        raise ValueError(f"prompt tokens must be (Lp, D) or (B={batch}, Lp, D), got {tokens.shape}")
    return tokens


def lora_delta(x: Array, factors: Mapping[str, Array], scaling: float) -> Array:
    """scaling * x @ A @ B over the last axis of x (x: (..., d_in) -> (..., d_out))."""
    return scaling * ((x @ factors["A"].astype(x.dtype)) @ factors["B"].astype(x.dtype))


def ssf(x: Array, params: Optional[Mapping[str, Mapping[str, Array]]], point: str) -> Array:
    """SSF (Lian et al., 2022): y = x * gamma + beta on the feature axis, if set at `point`."""
    if not params or point not in params:
        return x
    p = params[point]
    return x * p["scale"].astype(x.dtype) + p["shift"].astype(x.dtype)


def bottleneck(x: Array, params: Mapping[str, Any],
               on_hidden: Optional[Callable[[Array], Array]] = None,
               activation: str = "relu") -> Array:
    """up(act(down(x))), the adapter's residual branch (without the scale), ``act`` ReLU or
    the exact GELU (torch ``nn.GELU``, LAE's); ``on_hidden`` (e.g. dropout while training,
    as AdaptFormer) acts on the bottleneck activations."""
    h = x @ params["down"]["kernel"].astype(x.dtype) + params["down"]["bias"].astype(x.dtype)
    h = jax.nn.relu(h) if activation == "relu" else gelu(h, approximate=False)
    if on_hidden is not None:
        h = on_hidden(h)
    return h @ params["up"]["kernel"].astype(x.dtype) + params["up"]["bias"].astype(x.dtype)


# ------------------------------------------------------- layer keys of PEFT pytrees
def layer_index(key: Union[int, str]) -> int:
    """A layer key of a PEFT pytree as an int (``3`` or ``'3'``)."""
    if isinstance(key, bool):
        raise TypeError(f"layer keys must be ints, got {key!r}")
    if isinstance(key, int):
        return key
    if isinstance(key, str) and key.isdigit():
        return int(key)
    raise ValueError(f"PEFT pytrees are keyed by 0-based block index (int or digit string); "
                     f"got layer key {key!r}")


def resolve_layers(layers: Optional[Sequence[int]], num_layers: int, what: str) -> Tuple[int, ...]:
    """``layers`` (None = all) as a sorted tuple of valid block indices; clear error if not."""
    if layers is None:
        return tuple(range(num_layers))
    if isinstance(layers, int):
        layers = (layers,)
    resolved = tuple(sorted(set(int(layer) for layer in layers)))
    bad = [layer for layer in resolved if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"{what}: layers {bad} do not exist; the backbone has {num_layers} blocks "
                         f"(0..{num_layers - 1})")
    if not resolved:
        raise ValueError(f"{what}: layers is empty; pass None for all blocks or list some")
    return resolved


def gelu(x: Array, approximate: bool) -> Array:
    """GELU: the tanh form, or the exact ``x/2 (1 + erf(x / sqrt 2))`` -- the formula PyTorch's
    ``F.gelu`` computes. ``jax.nn.gelu(approximate=False)`` computes the same function through
    ``erfc``, which XLA:CPU runs about twice as slowly: on MiniLM's shapes (32 x 98 tokens)
    its forward and gradient took 25% of a step of the whole encoder
    (``experiments/benchmark_step.py --method progressive_prompts``). A narrower dtype
    (bf16) is computed in float32 and rounded once, as PyTorch's kernel does: in bf16
    throughout, ``1 + erf`` cancels to 0 below about -3.3."""
    if approximate:
        return jax.nn.gelu(x, approximate=True)
    wide = at_least_f32(x)
    return (0.5 * wide * (1.0 + jax.lax.erf(wide * 0.7071067811865476))).astype(x.dtype)


# Shared by the backbones' Flax modules (called inside their compact methods).
def at_least_f32(x: Array) -> Array:
    """``x`` in float32 if its dtype is narrower (bf16), unchanged otherwise."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def lora_input(lp: Optional[LayerPEFT], deterministic: bool, inp: Array) -> Array:
    """The LoRA branch's input: dropout (HF peft's lora_dropout) while training.
    Called inside a module's compact method, so the Dropout is that module's child."""
    if lp is None or lp.lora_dropout == 0.0 or deterministic:
        return inp
    return nn.Dropout(rate=lp.lora_dropout)(inp, deterministic=False)


def adapter_branch(lp: LayerPEFT, params: Mapping, x: Array, deterministic: bool) -> Array:
    """``scale * up(dropout(act(down(x))))``, ``act`` the context's ReLU or GELU; dropout
    only while training. Called inside a module's compact method, so the Dropout is that
    module's child."""
    dropout = None
    if lp.adapter_dropout and not deterministic:
        dropout = lambda h: nn.Dropout(rate=lp.adapter_dropout)(h, deterministic=False)
    return lp.adapter_scale * bottleneck(x, params, dropout, lp.adapter_activation)


def project_heads(x: Array, name: str, lp: Optional[LayerPEFT], heads: int, head_dim: int,
                  deterministic: bool, **dense) -> Array:
    """Attention projection ``name`` (query / key / value) of ``x`` ``(B, N, D)`` to
    ``(B, N, heads, head_dim)``, with the layer's LoRA and SSF at ``name``; a
    ``DenseGeneral`` child of the calling module (``dense``: its dtype, kernel_init)."""
    batch, length, dim = x.shape
    y = nn.DenseGeneral(features=(heads, head_dim), name=name, **dense)(x)
    y = y.reshape(batch, length, dim)
    lora = (lp.lora or {}) if lp is not None else {}
    if name in lora:
        y = y + lora_delta(lora_input(lp, deterministic, x), lora[name], lp.lora_scaling)
    y = ssf(y, lp.ssf if lp is not None else None, name)
    return y.reshape(batch, length, heads, head_dim)


def with_prefix(lp: Optional[LayerPEFT], k: Array, v: Array) -> Tuple[Array, Array, int]:
    """Keys and values ``(B, K, H, hd)`` with the layer's prefix keys / values in front
    (prefix tuning), and the number of prefix columns (0 without)."""
    if lp is None or lp.prefix_key is None:
        return k, v, 0
    batch, _, heads, head_dim = k.shape
    pk = as_batched(lp.prefix_key, batch).astype(k.dtype)
    pv = as_batched(lp.prefix_value, batch).astype(v.dtype)
    if pk.shape[-1] != heads * head_dim or pv.shape != pk.shape:
        raise ValueError(f"prefix key/value must be (B, Lp, {heads * head_dim}); got "
                         f"{pk.shape}, {pv.shape}")
    k = jnp.concatenate([pk.reshape(batch, -1, heads, head_dim), k], axis=1)
    v = jnp.concatenate([pv.reshape(batch, -1, heads, head_dim), v], axis=1)
    return k, v, pk.shape[1]


def compensate_prefix(weights: Array, num_prefix: int) -> Array:
    """LAE's compensated prefix: the attention weights of the prefix columns (the first
    ``num_prefix``) divided by their sum ``lambda``, i.e. ``(1 - lambda) Attn(x) +
    Attn_prefix(x)`` after the value product."""
    lam = jnp.maximum(weights[..., :num_prefix].sum(-1, keepdims=True), 1e-12)
    return jnp.concatenate([weights[..., :num_prefix] / lam, weights[..., num_prefix:]],
                           axis=-1)
