"""Vision Transformer with PEFT hook points.

The parameter tree follows Google's ``vision_transformer`` checkpoints exactly
(``embedding``, ``cls``, ``Transformer/posembed_input/pos_embedding``,
``Transformer/encoderblock_N/{LayerNorm_0, MultiHeadDotProductAttention_1/{query,key,value,out},
LayerNorm_2, MlpBlock_3/{Dense_0,Dense_1}}``, ``Transformer/encoder_norm``, optional
``pre_logits`` and ``head``), so an original ``.npz`` loads without renaming.

The forward takes an optional :class:`~pecft_jax.backbones.context.PEFTContext`; with none (or an
empty one) it is exactly the plain ViT. The token layout with prompts is
``[CLS, prompt tokens, patch tokens]``: prompts are inserted after the position embedding
is added (they carry no position), as in VPT, L2P and DualPrompt.

Functional use::

    cfg = get_config("ViT-B/16", num_classes=0)
    params = init_params(cfg, jax.random.key(0))
    feats = apply(cfg, params, images, peft=ctx, output="cls")
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pecft_jax.backbones.context import (LayerPEFT, PEFTContext, adapter_branch,
                                         as_batched, at_least_f32, compensate_prefix,
                                         gelu, lora_delta, lora_input, project_heads, ssf,
                                         with_prefix)

Array = jax.Array
OUTPUTS = ("logits", "pre_logits", "cls", "tokens", "features")
COMPUTE_DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("einsum", "xla", "cudnn")


def check_execution(dtype: str, attention: str) -> None:
    """A backbone's ``dtype`` and ``attention`` (ViT's and BERT's): known values, and cuDNN's
    fused attention only on the bf16 inputs it takes (jax.nn.dot_product_attention would
    raise at the first trace otherwise)."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"backbone dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}")
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"backbone attention must be one of {ATTENTION_IMPLS}, got "
                         f"{attention!r}")
    if attention == "cudnn" and dtype != "bfloat16":
        raise ValueError(f"backbone attention 'cudnn' (cuDNN's fused flash attention) takes "
                         f"bf16 inputs only, and dtype is {dtype!r}: set backbone.dtype="
                         f"'bfloat16', or attention 'xla' (any dtype, any device)")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of a ViT. ``num_classes=0`` means no ``head`` parameters."""
    name: str
    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    num_channels: int = 3
    num_classes: int = 0
    representation_size: Optional[int] = None
    classifier: str = "token"  # 'token' ([CLS]) or 'gap' (mean of patch tokens)
    gelu_approximate: bool = True  # Google's JAX ViT uses tanh-GELU; HF and timm use exact
    layer_norm_eps: float = 1e-6
    # Execution, not architecture (the parameters are float32 whatever these say):
    # 'bfloat16' runs activations and matmuls in bf16 (LayerNorm statistics and the attention
    # softmax in float32; outputs returned as float32), for accelerators' bf16 units.
    dtype: str = "float32"
    # 'einsum': the explicit softmax; 'xla' / 'cudnn': jax.nn.dot_product_attention with that
    # implementation -- 'cudnn' is cuDNN's fused flash attention (NVIDIA GPUs, bf16/fp16
    # inputs only: it raises otherwise); 'xla' is JAX's reference path for any device.
    attention: str = "einsum"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"{self.name}: image_size {self.image_size} is not a multiple "
                             f"of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"{self.name}: hidden_size {self.hidden_size} is not divisible "
                             f"by num_heads {self.num_heads}")
        if self.classifier not in ("token", "gap"):
            raise ValueError(f"classifier must be 'token' or 'gap', got {self.classifier!r}")
        check_execution(self.dtype, self.attention)

    @property
    def compute_dtype(self):
        """The Flax modules' ``dtype``: None for 'float32' (inferred from the inputs and
        parameters, exactly as before the option existed; float64 under ``jax.enable_x64``
        for gradient checks), bfloat16 otherwise."""
        return None if self.dtype == "float32" else jnp.dtype(self.dtype)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_NAMED = {
    # name: (patch, hidden, layers, heads, mlp, image)
    "ViT-Ti/16": (16, 192, 12, 3, 768, 224),
    "ViT-S/16": (16, 384, 12, 6, 1536, 224),
    "ViT-B/16": (16, 768, 12, 12, 3072, 224),
    "ViT-B/32": (32, 768, 12, 12, 3072, 224),
    "ViT-L/16": (16, 1024, 24, 16, 4096, 224),
    # Small backbones for 28x28 grey-scale (MNIST-like) and 32x32 colour inputs.
    "ViT-Demo/7": (7, 128, 6, 4, 256, 28),
    "ViT-Demo/4": (4, 128, 6, 4, 256, 28),
    "ViT-Tiny32/4": (4, 192, 6, 3, 384, 32),
    # A few-thousand-parameter ViT for fast end-to-end tests (16x16 grey-scale).
    "ViT-Micro/4": (4, 32, 2, 2, 64, 16),
}
_DEFAULT_CHANNELS = {"ViT-Demo/7": 1, "ViT-Demo/4": 1, "ViT-Micro/4": 1}


def named_configs() -> tuple:
    return tuple(_NAMED)


def get_config(name: str, **overrides) -> ViTConfig:
    """A named architecture (``ViT-B/16`` ...), with optional field overrides."""
    if name not in _NAMED:
        raise ValueError(f"unknown ViT config {name!r}; known: {', '.join(_NAMED)}")
    patch, hidden, layers, heads, mlp, image = _NAMED[name]
    fields = dict(name=name, image_size=image, patch_size=patch, hidden_size=hidden,
                  num_layers=layers, num_heads=heads, mlp_dim=mlp,
                  num_channels=_DEFAULT_CHANNELS.get(name, 3))
    fields.update(overrides)
    return ViTConfig(**fields)


def _layer_norm(cfg: ViTConfig, name: str) -> nn.LayerNorm:
    # Flax computes the statistics in float32 even for a bf16 dtype
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, name=name)


class Attention(nn.Module):
    """Multi-head self-attention with Google's parameter layout and PEFT hooks."""
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x: Array, lp: Optional[LayerPEFT], deterministic: bool) -> Array:
        cfg = self.cfg
        batch, length, dim = x.shape
        heads, head_dim = cfg.num_heads, cfg.head_dim
        lora = (lp.lora or {}) if lp is not None else {}
        ssf_params = lp.ssf if lp is not None else None
        q, k, v = (project_heads(x, name, lp, heads, head_dim, deterministic,
                                 dtype=cfg.compute_dtype) for name in ("query", "key", "value"))
        k, v, num_prefix = with_prefix(lp, k, v)
        compensated = num_prefix > 0 and lp.prefix_compensated
        if cfg.attention != "einsum" and not compensated:
            attended = jax.nn.dot_product_attention(q, k, v, implementation=cfg.attention)
        else:
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
            # the softmax in at least float32 (a no-op for float32 / float64 activations)
            weights = jax.nn.softmax(at_least_f32(scores), axis=-1)
            if compensated:
                weights = compensate_prefix(weights, num_prefix)
            attended = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
        out = nn.DenseGeneral(features=dim, axis=(-2, -1), dtype=cfg.compute_dtype,
                              name="out")(attended)
        if "out" in lora:
            merged = attended.reshape(batch, length, dim)
            out = out + lora_delta(lora_input(lp, deterministic, merged), lora["out"],
                                   lp.lora_scaling)
        return ssf(out, ssf_params, "out")


class MlpBlock(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x: Array, lp: Optional[LayerPEFT], deterministic: bool) -> Array:
        cfg = self.cfg
        lora = (lp.lora or {}) if lp is not None else {}
        ssf_params = lp.ssf if lp is not None else None

        h = nn.Dense(cfg.mlp_dim, dtype=cfg.compute_dtype, name="Dense_0")(x)
        if "fc1" in lora:
            h = h + lora_delta(lora_input(lp, deterministic, x), lora["fc1"], lp.lora_scaling)
        h = ssf(h, ssf_params, "fc1")
        h = gelu(h, approximate=cfg.gelu_approximate)
        y = nn.Dense(cfg.hidden_size, dtype=cfg.compute_dtype, name="Dense_1")(h)
        if "fc2" in lora:
            y = y + lora_delta(lora_input(lp, deterministic, h), lora["fc2"], lp.lora_scaling)
        return ssf(y, ssf_params, "fc2")


class EncoderBlock(nn.Module):
    """Pre-norm block. Returns the new tokens and what its sub-layers saw: ``attn_input``
    (the tokens the query/key/value projections read, after LayerNorm_0 and its SSF) and
    ``mlp_input`` (what MlpBlock's first Dense reads) -- the layer inputs whose span
    gradient-projection methods (GPM, InfLoRA) build their subspaces from."""
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x: Array, lp: Optional[LayerPEFT], deterministic: bool) -> tuple:
        ssf_params = lp.ssf if lp is not None else None
        attn_input = ssf(_layer_norm(self.cfg, "LayerNorm_0")(x), ssf_params, "ln1")
        h = Attention(self.cfg, name="MultiHeadDotProductAttention_1")(attn_input, lp,
                                                                       deterministic)
        if lp is not None and lp.adapter_attn is not None:
            source = h if lp.adapter_attn_mode == "sequential" else attn_input
            h = h + adapter_branch(lp, lp.adapter_attn, source, deterministic)
        x = x + h
        mlp_input = ssf(_layer_norm(self.cfg, "LayerNorm_2")(x), ssf_params, "ln2")
        h = MlpBlock(self.cfg, name="MlpBlock_3")(mlp_input, lp, deterministic)
        if lp is not None and lp.adapter is not None:
            if lp.adapter_mode == "sequential":
                h = h + adapter_branch(lp, lp.adapter, h, deterministic)
            else:  # AdaptFormer: a parallel branch from the block's residual stream
                h = h + adapter_branch(lp, lp.adapter, x, deterministic)
        return x + h, {"attn_input": attn_input, "mlp_input": mlp_input}


def _insert_prompt(x: Array, num_prompts: int, lp: LayerPEFT) -> tuple:
    """Put lp.prompt after [CLS]; returns (tokens, new prompt count)."""
    if lp.prompt_mask is not None:
        raise ValueError("prompt_mask needs an attention mask, which the ViT does not have "
                         "(every token attends to every token); it is for text backbones")
    batch, _, dim = x.shape
    prompt = as_batched(lp.prompt, batch).astype(x.dtype)
    if prompt.shape[-1] != dim:
        raise ValueError(f"prompt tokens have width {prompt.shape[-1]}, the ViT has {dim}")
    keep_from = 1 + num_prompts if lp.prompt_mode == "replace" else 1
    x = jnp.concatenate([x[:, :1], prompt, x[:, keep_from:]], axis=1)
    added = prompt.shape[1]
    return x, (added if lp.prompt_mode == "replace" else num_prompts + added)


class ViT(nn.Module):
    """Flax ViT. ``output`` picks what is returned:

    * ``'logits'``     -- head(pre_logits) (needs ``num_classes > 0``)
    * ``'pre_logits'`` -- the pooled feature (after ``pre_logits`` Dense+tanh if configured)
    * ``'cls'``        -- the normed [CLS] token (or patch mean for ``classifier='gap'``)
    * ``'tokens'``     -- all normed tokens ``(B, 1 + prompts + patches, D)``
    * ``'features'``   -- a dict with ``tokens``, ``cls``, ``pre_logits``, ``num_prompts``
                          (a Python int), ``blocks`` (per block run, in order: a dict with
                          its ``attn_input`` and ``mlp_input``, each ``(B, N, D)``; see
                          :class:`EncoderBlock`) and ``logits`` when there is a head. Under
                          ``jit`` what is not used is never computed or kept.

    ``stop_at_layer=k`` runs only blocks ``0..k-1`` and returns their raw (un-normed) tokens
    for ``'tokens'``/``'cls'``/``'features'``.
    """
    cfg: ViTConfig

    @nn.compact
    def __call__(self, images: Array, peft: Optional[PEFTContext] = None, *,
                 output: str = "logits", stop_at_layer: Optional[int] = None,
                 deterministic: bool = True) -> Any:
        cfg = self.cfg
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"{cfg.name} expects images of shape (B, {expected[0]}, "
                             f"{expected[1]}, {expected[2]}) (NHWC); got {tuple(images.shape)}")
        if stop_at_layer is not None:
            if not 0 <= stop_at_layer <= cfg.num_layers:
                raise ValueError(f"stop_at_layer must be in [0, {cfg.num_layers}]")
            if output in ("logits", "pre_logits"):
                raise ValueError("stop_at_layer returns intermediate tokens; use output='tokens', "
                                 "'cls' or 'features'")
        x = nn.Conv(cfg.hidden_size, (cfg.patch_size, cfg.patch_size),
                    strides=(cfg.patch_size, cfg.patch_size), padding="VALID",
                    dtype=cfg.compute_dtype, name="embedding")(images)
        batch = x.shape[0]
        x = ssf(x.reshape(batch, -1, cfg.hidden_size), peft.ssf if peft is not None else None,
                "embed")
        cls = self.param("cls", nn.initializers.zeros, (1, 1, cfg.hidden_size))
        x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, cfg.hidden_size)).astype(x.dtype),
                             x], axis=1)
        tokens, num_prompts, blocks = _PosEmbedTransformer(cfg, name="Transformer")(
            x, peft, stop_at_layer, deterministic)
        # what the methods read (keys, heads, statistics) is float32 whatever the compute dtype
        tokens = at_least_f32(tokens)
        blocks = jax.tree_util.tree_map(at_least_f32, blocks)
        if cfg.classifier == "token":
            pooled = tokens[:, 0]
        else:
            pooled = tokens[:, 1 + num_prompts:].mean(axis=1)
        if output == "tokens":
            return tokens
        if output == "cls":
            return pooled
        pre_logits = pooled
        if stop_at_layer is None and cfg.representation_size is not None:
            pre_logits = jnp.tanh(nn.Dense(cfg.representation_size, name="pre_logits")(pooled))
        if output == "pre_logits":
            return pre_logits
        logits = None
        if cfg.num_classes and stop_at_layer is None:
            logits = nn.Dense(cfg.num_classes, kernel_init=nn.initializers.zeros,
                              name="head")(pre_logits)
        if output == "logits":
            if logits is None:
                raise ValueError(f"{cfg.name} was built with num_classes=0: it has no head; ask "
                                 f"for output='pre_logits' and apply your own classifier")
            return logits
        feats = {"tokens": tokens, "cls": pooled, "pre_logits": pre_logits,
                 "num_prompts": num_prompts, "blocks": blocks}
        if logits is not None:
            feats["logits"] = logits
        return feats


class _PosEmbed(nn.Module):
    """Holds ``pos_embedding`` under the name Google's checkpoints use."""
    num_positions: int
    hidden_size: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                         (1, self.num_positions, self.hidden_size))
        if pos.shape[1] != x.shape[1]:
            raise ValueError(f"position embedding has {pos.shape[1]} positions but the input has "
                             f"{x.shape[1]} tokens; resize it with "
                             f"pecft_jax.backbones.pretrained.resize_pos_embedding")
        return x + pos.astype(x.dtype)


class _PosEmbedTransformer(nn.Module):
    """``Transformer`` scope: posembed_input, encoderblock_N, encoder_norm."""
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x: Array, peft: Optional[PEFTContext], stop_at_layer: Optional[int],
                 deterministic: bool) -> tuple:
        cfg = self.cfg
        x = _PosEmbed(cfg.num_patches + 1, cfg.hidden_size, name="posembed_input")(x)
        num_prompts = 0
        last = cfg.num_layers if stop_at_layer is None else stop_at_layer
        if peft is not None:
            unknown = [layer for layer in peft.layers if not 0 <= layer < cfg.num_layers]
            if unknown:
                raise ValueError(f"PEFT context names layers {unknown}, but {cfg.name} has "
                                 f"{cfg.num_layers} blocks (0..{cfg.num_layers - 1})")
        blocks = []
        for layer in range(last):
            lp = peft.at(layer) if peft is not None else None
            if lp is not None and lp.prompt is not None:
                x, num_prompts = _insert_prompt(x, num_prompts, lp)
            x, seen = EncoderBlock(cfg, name=f"encoderblock_{layer}")(x, lp, deterministic)
            blocks.append(seen)
        if stop_at_layer is None:
            x = ssf(_layer_norm(cfg, "encoder_norm")(x), peft.ssf if peft is not None else None,
                    "final")
        return x, num_prompts, blocks


def build(cfg: ViTConfig) -> ViT:
    return ViT(cfg)


def init_params(cfg: ViTConfig, rng: Array) -> dict:
    """Randomly initialised parameters (a plain nested dict)."""
    dummy = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
    variables = ViT(cfg).init(rng, dummy, output="features")
    return jax.tree_util.tree_map(lambda a: a, dict(variables["params"]))


def apply(cfg: ViTConfig, params: Mapping, images: Array, peft: Optional[PEFTContext] = None,
          *, output: str = "logits", stop_at_layer: Optional[int] = None,
          deterministic: bool = True, dropout_rng: Optional[Array] = None) -> Any:
    """Functional forward: ``params`` is the frozen tree (never differentiated by the
    library); trainable pieces come in through ``peft``."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return ViT(cfg).apply({"params": params}, images, peft, output=output,
                          stop_at_layer=stop_at_layer, deterministic=deterministic, rngs=rngs)


def param_count(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
