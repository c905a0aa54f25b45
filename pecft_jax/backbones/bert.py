"""BERT-family text encoder (post-LN) with the ViT's PEFT hook points.

The same :class:`~pecft_jax.backbones.context.PEFTContext` that drives the ViT drives this
encoder; with none (or an empty one) it is exactly the plain BERT encoder (Devlin et al.,
2019; Hugging Face ``BertModel`` without its pooler).

Inputs are ``token_ids (B, T)`` (int), ``attention_mask (B, T)`` (1 for a real token, 0 for
padding) and optionally ``token_type_ids (B, T)`` (zeros by default). Position 0 must hold
the [CLS] token (the tokenizer's template puts it there). The padding mask is added to
every attention score as a large negative number (``finfo.min``, as Hugging Face BERT)
wherever a key column is padding, so a padded position never changes a real token's
output; an all-padding row (a padded example of a fixed-size batch) gives finite values.

Parameter tree. The names of the adapted modules are the ViT's, so that path-based tools
(LoRA merge, learning-rate multipliers by path regex, subspace methods) find them at the
same places::

    embeddings/word_embeddings/embedding          (vocab, D)
    embeddings/position_embeddings/embedding      (max_positions, D)
    embeddings/token_type_embeddings/embedding    (type_vocab, D)
    embeddings/LayerNorm/{scale, bias}
    Transformer/encoderblock_N/MultiHeadDotProductAttention_1/{query,key,value}
                                                  kernel (D, H, hd), bias (H, hd)
    Transformer/encoderblock_N/MultiHeadDotProductAttention_1/out
                                                  kernel (H, hd, D), bias (D,)
    Transformer/encoderblock_N/LayerNorm_0        the post-attention LayerNorm (LN1)
    Transformer/encoderblock_N/MlpBlock_3/Dense_0 fc1, kernel (D, I)
    Transformer/encoderblock_N/MlpBlock_3/Dense_1 fc2, kernel (I, D)
    Transformer/encoderblock_N/LayerNorm_2        the post-FFN LayerNorm (LN2)

There is no final ``encoder_norm`` (post-LN: each block ends with its own LayerNorm) and no
pooler (sentence encoders pool the tokens; :func:`load_hf_bert` ignores a checkpoint's).

Embeddings: ``e = word[ids] + position[0..T-1] + token_type[type_ids]``, ``x = LN(e)``,
``x = ssf(x, 'embed')`` (model-level SSF), dropout (only when not deterministic).

Where each hook sits in block ``l`` (``x`` is the block's input, the previous block's
output; ``s(., p)`` is the block's SSF at point ``p``)::

    prompt           inserted into x right after [CLS] (position 0) before the block runs;
                     at l == 0 after the embeddings' LayerNorm, SSF 'embed' and dropout --
                     prompts carry no position embedding, as in the ViT. 'append' puts
                     them in front of earlier prompts, 'replace' overwrites them. Their
                     attention-mask entries are lp.prompt_mask (default 1); they are not
                     pooled by 'mean'.
    attn_input  = x                                 (what query/key/value read)
    q = s(Wq x + bq + lora_query(x), 'query')       (k, v alike: 'key', 'value')
    prefix_key/value concatenated in front of the projected k / v; mask 1 for those
                     columns; prefix_compensated (LAE) divides the prefix columns of the
                     attention weights by their sum.
    a   = s(Wo attended + bo + lora_out(attended), 'out'); dropout
    adapter_attn     sequential: a = a + s_a * up(act(down(a)))   (before residual + LN1)
                     parallel:   a = a + s_a * up(act(down(attn_input)))
    mlp_input = s(LN1(x + a), 'ln1')                (what fc1 reads; also the FFN residual)
    h   = s(W1 mlp_input + b1 + lora_fc1(mlp_input), 'fc1');  h = GELU(h) (exact erf)
    f   = s(W2 h + b2 + lora_fc2(h), 'fc2'); dropout
    adapter          sequential (Houlsby): f = f + s_a * up(act(down(f)))  (before
                     residual + LN2); parallel (AdaptFormer): f = f + s_a *
                     up(act(down(mlp_input))), the FFN's input, beside the FFN
    out = s(LN2(mlp_input + f), 'ln2')              (the block's output)

After the last block the model-level SSF 'final' scales and shifts every token.

Outputs (``output=``): ``'tokens'`` ``(B, 1 + prompts + T - 1, D)`` in the order
``[CLS, prompts, rest]``; ``'cls'`` the [CLS] token's last hidden state (not HF's
``pooler_output``, which is ``tanh(dense(cls))``); ``'mean'`` the mean of the real
tokens (attention_mask-weighted, prompts excluded: sentence-transformers' mean pooling);
``'pooled'`` whichever of the two ``cfg.pooling`` names; ``'features'`` a dict with
``tokens``, ``cls``, ``mean``, ``pooled``, ``num_prompts`` (a Python int),
``attention_mask`` (the ``(B, T')`` key mask the attention used: 1 for prompts),
``pool_mask`` (what 'mean' weighted by) and ``blocks`` (per block run: ``attn_input`` and
``mlp_input``, see above).

Functional use::

    cfg, params = load_hf_bert("path/to/all-MiniLM-L6-v2")
    emb = apply(cfg, params, token_ids, attention_mask, peft=ctx, output="mean")
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pecft_jax.backbones.context import (LayerPEFT, PEFTContext, adapter_branch,
                                         as_batched, at_least_f32, compensate_prefix,
                                         gelu, lora_delta, lora_input, project_heads, ssf,
                                         with_prefix)
from pecft_jax.backbones.vit import check_execution

Array = jax.Array
OUTPUTS = ("tokens", "cls", "mean", "pooled", "features")
POOLINGS = ("cls", "mean")
# Hugging Face hidden_act names of the exact (erf) GELU.
_EXACT_GELU = ("gelu", "gelu_python")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT encoder (post-LN, absolute positions, exact GELU)."""
    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"  # the exact erf GELU (HF 'gelu'); nothing else is implemented
    pooling: str = "cls"      # what output='pooled' returns: 'cls' or 'mean'
    # Dropout rates (HF hidden_dropout_prob / attention_probs_dropout_prob); they act only
    # when apply(..., deterministic=False).
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    # Execution, not architecture (as ViTConfig): 'bfloat16' activations, and the attention
    # as an explicit softmax ('einsum') or jax.nn.dot_product_attention ('xla' / 'cudnn').
    dtype: str = "float32"
    attention: str = "einsum"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"{self.name}: hidden_size {self.hidden_size} is not divisible "
                             f"by num_heads {self.num_heads}")
        if self.hidden_act != "gelu":
            raise ValueError(f"{self.name}: hidden_act {self.hidden_act!r} is not implemented; "
                             f"only the exact GELU ('gelu')")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        check_execution(self.dtype, self.attention)
        for field in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(f"{field} must be in [0, 1), got {getattr(self, field)}")

    @property
    def compute_dtype(self):
        """The Flax modules' ``dtype`` (see ``ViTConfig.compute_dtype``)."""
        return None if self.dtype == "float32" else jnp.dtype(self.dtype)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **changes) -> "BertConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_NAMED = {
    # name: (vocab, hidden, layers, heads, intermediate, max_positions, type_vocab)
    "BERT-Micro": (128, 32, 2, 2, 64, 64, 2),          # tests
    # tests of whole runs: BERT-Tiny with the 6 blocks the methods' default layers name
    "BERT-Tiny6": (30522, 128, 6, 2, 512, 512, 2),
    "BERT-Tiny": (30522, 128, 2, 2, 512, 512, 2),      # google/bert_uncased_L-2_H-128_A-2
    "MiniLM-L6-H384": (30522, 384, 6, 12, 1536, 512, 2),  # all-MiniLM-L6-v2's encoder
    "BERT-Base": (30522, 768, 12, 12, 3072, 512, 2),
    "BERT-Large": (30522, 1024, 24, 16, 4096, 512, 2),
}
_ARCH_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size")


def named_configs() -> tuple:
    return tuple(_NAMED)


def get_config(name: str, **overrides) -> BertConfig:
    """A named architecture (``BERT-Micro``, ``MiniLM-L6-H384``, ``BERT-Base`` ...)."""
    if name not in _NAMED:
        raise ValueError(f"unknown BERT config {name!r}; known: {', '.join(_NAMED)}")
    fields = dict(zip(_ARCH_FIELDS, _NAMED[name]), name=name)
    fields.update(overrides)
    return BertConfig(**fields)


def _name_for(fields: Mapping[str, Any]) -> str:
    for name, arch in _NAMED.items():
        if all(fields[f] == v for f, v in zip(_ARCH_FIELDS, arch)):
            return name
    return (f"BERT-D{fields['hidden_size']}-L{fields['num_layers']}-H{fields['num_heads']}"
            f"-I{fields['intermediate_size']}")


def from_hf_config(conf: Mapping[str, Any], **overrides) -> BertConfig:
    """A :class:`BertConfig` from a Hugging Face BERT ``config.json`` (as a dict);
    ``overrides`` set other fields (``name``, ``pooling``, ``dtype``, ``attention`` ...)."""
    conf = dict(conf)
    model_type = conf.get("model_type", "bert")
    if model_type != "bert":
        raise ValueError(f"config.json has model_type={model_type!r}; only 'bert' is "
                         f"supported (other families differ in positions or layout)")
    act = conf.get("hidden_act", "gelu")
    if act not in _EXACT_GELU:
        raise ValueError(f"config.json hidden_act={act!r} is not supported; only the exact "
                         f"GELU {_EXACT_GELU}")
    position_type = conf.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(f"config.json position_embedding_type={position_type!r}; only "
                         f"'absolute' is supported")
    if conf.get("is_decoder") or conf.get("add_cross_attention"):
        raise ValueError("config.json describes a decoder / cross-attention BERT; only the "
                         "encoder is supported")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                           "num_attention_heads", "intermediate_size") if k not in conf]
    if missing:
        raise ValueError(f"config.json lacks {missing}")
    fields = dict(vocab_size=int(conf["vocab_size"]), hidden_size=int(conf["hidden_size"]),
                  num_layers=int(conf["num_hidden_layers"]),
                  num_heads=int(conf["num_attention_heads"]),
                  intermediate_size=int(conf["intermediate_size"]),
                  max_position_embeddings=int(conf.get("max_position_embeddings", 512)),
                  type_vocab_size=int(conf.get("type_vocab_size", 2)),
                  layer_norm_eps=float(conf.get("layer_norm_eps", 1e-12)),
                  hidden_dropout=float(conf.get("hidden_dropout_prob", 0.1)),
                  attention_dropout=float(conf.get("attention_probs_dropout_prob", 0.1)))
    fields["name"] = _name_for(fields)
    fields.update(overrides)
    return BertConfig(**fields)


# --------------------------------------------------------------------------------------------
# Modules.
# --------------------------------------------------------------------------------------------

_INIT = nn.initializers.normal(stddev=0.02)  # BERT's initializer_range


def _layer_norm(cfg: BertConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, name=name)


def _dropout(x: Array, rate: float, deterministic: bool) -> Array:
    """Dropout while training only (a child of the calling module's compact method)."""
    if deterministic or rate == 0.0:
        return x
    return nn.Dropout(rate=rate)(x, deterministic=False)


class BertAttention(nn.Module):
    """Self-attention with the padding mask as an additive bias and the PEFT hooks."""
    cfg: BertConfig

    @nn.compact
    def __call__(self, x: Array, key_mask: Array, lp: Optional[LayerPEFT],
                 deterministic: bool) -> Array:
        cfg = self.cfg
        batch, length, dim = x.shape
        heads, head_dim = cfg.num_heads, cfg.head_dim
        lora = (lp.lora or {}) if lp is not None else {}
        ssf_params = lp.ssf if lp is not None else None

        q, k, v = (project_heads(x, name, lp, heads, head_dim, deterministic,
                                 dtype=cfg.compute_dtype, kernel_init=_INIT)
                   for name in ("query", "key", "value"))
        k, v, num_prefix = with_prefix(lp, k, v)
        if num_prefix:  # the prefix columns are always attended to
            key_mask = jnp.concatenate([jnp.ones((batch, num_prefix), key_mask.dtype),
                                        key_mask], axis=1)
        compensated = num_prefix > 0 and lp.prefix_compensated
        attn_dropout = cfg.attention_dropout if not deterministic else 0.0
        keep = key_mask[:, None, None, :].astype(bool)  # (B, 1, 1, K)
        if cfg.attention != "einsum" and not compensated and attn_dropout == 0.0:
            dtype = q.dtype
            bias = jnp.where(keep, jnp.zeros((), dtype), jnp.finfo(dtype).min).astype(dtype)
            attended = jax.nn.dot_product_attention(q, k, v, bias=bias,
                                                    implementation=cfg.attention)
        else:
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
            scores = at_least_f32(scores)  # the softmax in at least float32
            scores = scores + jnp.where(keep, jnp.zeros((), scores.dtype),
                                        jnp.finfo(scores.dtype).min)
            weights = jax.nn.softmax(scores, axis=-1)
            if compensated:
                weights = compensate_prefix(weights, num_prefix)
            weights = _dropout(weights, attn_dropout, deterministic)
            attended = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
        out = nn.DenseGeneral(features=dim, axis=(-2, -1), dtype=cfg.compute_dtype,
                              kernel_init=_INIT, name="out")(attended)
        if "out" in lora:
            flat = attended.reshape(batch, length, dim)
            out = out + lora_delta(lora_input(lp, deterministic, flat), lora["out"],
                                   lp.lora_scaling)
        return ssf(out, ssf_params, "out")


class BertMlp(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, x: Array, lp: Optional[LayerPEFT], deterministic: bool) -> Array:
        cfg = self.cfg
        lora = (lp.lora or {}) if lp is not None else {}
        ssf_params = lp.ssf if lp is not None else None
        h = nn.Dense(cfg.intermediate_size, dtype=cfg.compute_dtype, kernel_init=_INIT,
                     name="Dense_0")(x)
        if "fc1" in lora:
            h = h + lora_delta(lora_input(lp, deterministic, x), lora["fc1"], lp.lora_scaling)
        h = ssf(h, ssf_params, "fc1")
        h = gelu(h, approximate=False)
        y = nn.Dense(cfg.hidden_size, dtype=cfg.compute_dtype, kernel_init=_INIT,
                     name="Dense_1")(h)
        if "fc2" in lora:
            y = y + lora_delta(lora_input(lp, deterministic, h), lora["fc2"], lp.lora_scaling)
        return ssf(y, ssf_params, "fc2")


class BertLayer(nn.Module):
    """Post-LN block; returns the new tokens and ``{'attn_input', 'mlp_input'}`` (see the
    module docstring for where every hook sits)."""
    cfg: BertConfig

    @nn.compact
    def __call__(self, x: Array, key_mask: Array, lp: Optional[LayerPEFT],
                 deterministic: bool) -> tuple:
        cfg = self.cfg
        ssf_params = lp.ssf if lp is not None else None
        attn_input = x
        a = BertAttention(cfg, name="MultiHeadDotProductAttention_1")(x, key_mask, lp,
                                                                      deterministic)
        a = _dropout(a, cfg.hidden_dropout, deterministic)
        if lp is not None and lp.adapter_attn is not None:
            source = a if lp.adapter_attn_mode == "sequential" else attn_input
            a = a + adapter_branch(lp, lp.adapter_attn, source, deterministic)
        mlp_input = ssf(_layer_norm(cfg, "LayerNorm_0")(x + a), ssf_params, "ln1")
        f = BertMlp(cfg, name="MlpBlock_3")(mlp_input, lp, deterministic)
        f = _dropout(f, cfg.hidden_dropout, deterministic)
        if lp is not None and lp.adapter is not None:
            source = f if lp.adapter_mode == "sequential" else mlp_input
            f = f + adapter_branch(lp, lp.adapter, source, deterministic)
        out = ssf(_layer_norm(cfg, "LayerNorm_2")(mlp_input + f), ssf_params, "ln2")
        return out, {"attn_input": attn_input, "mlp_input": mlp_input}


def _insert_prompt(x: Array, key_mask: Array, num_prompts: int, lp: LayerPEFT) -> tuple:
    """Put lp.prompt after [CLS] (mask lp.prompt_mask, default 1); returns (tokens, key
    mask, new prompt count)."""
    batch, _, dim = x.shape
    prompt = as_batched(lp.prompt, batch).astype(x.dtype)
    if prompt.shape[-1] != dim:
        raise ValueError(f"prompt tokens have width {prompt.shape[-1]}, the encoder has {dim}")
    added = prompt.shape[1]
    if lp.prompt_mask is None:
        prompt_mask = jnp.ones((batch, added), key_mask.dtype)
    else:
        prompt_mask = jnp.broadcast_to(jnp.asarray(lp.prompt_mask), (batch, added))
        prompt_mask = prompt_mask.astype(key_mask.dtype)
    keep_from = 1 + num_prompts if lp.prompt_mode == "replace" else 1
    x = jnp.concatenate([x[:, :1], prompt, x[:, keep_from:]], axis=1)
    key_mask = jnp.concatenate([key_mask[:, :1], prompt_mask, key_mask[:, keep_from:]], axis=1)
    return x, key_mask, (added if lp.prompt_mode == "replace" else num_prompts + added)


class BertEmbeddings(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, token_ids: Array, token_type_ids: Array) -> Array:
        cfg = self.cfg
        length = token_ids.shape[1]
        word = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
                        embedding_init=_INIT, name="word_embeddings")(token_ids)
        position = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                            dtype=cfg.compute_dtype, embedding_init=_INIT,
                            name="position_embeddings")(jnp.arange(length)[None])
        token_type = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
                              embedding_init=_INIT, name="token_type_embeddings")(token_type_ids)
        return _layer_norm(cfg, "LayerNorm")(word + position + token_type)


class _Encoder(nn.Module):
    """``Transformer`` scope: encoderblock_N."""
    cfg: BertConfig

    @nn.compact
    def __call__(self, x: Array, key_mask: Array, peft: Optional[PEFTContext],
                 stop_at_layer: Optional[int], deterministic: bool) -> tuple:
        cfg = self.cfg
        num_prompts = 0
        last = cfg.num_layers if stop_at_layer is None else stop_at_layer
        blocks = []
        for layer in range(last):
            lp = peft.at(layer) if peft is not None else None
            if lp is not None and lp.prompt is not None:
                x, key_mask, num_prompts = _insert_prompt(x, key_mask, num_prompts, lp)
            x, seen = BertLayer(cfg, name=f"encoderblock_{layer}")(x, key_mask, lp,
                                                                   deterministic)
            blocks.append(seen)
        return x, key_mask, num_prompts, blocks


class Bert(nn.Module):
    """Flax BERT encoder; see the module docstring for inputs, hooks and ``output``.

    ``stop_at_layer=k`` runs only blocks ``0..k-1`` and returns their output (without the
    model-level SSF 'final').
    """
    cfg: BertConfig

    @nn.compact
    def __call__(self, token_ids: Array, attention_mask: Array,
                 peft: Optional[PEFTContext] = None, *, token_type_ids: Optional[Array] = None,
                 output: str = "pooled", stop_at_layer: Optional[int] = None,
                 deterministic: bool = True) -> Any:
        cfg = self.cfg
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if token_ids.ndim != 2:
            raise ValueError(f"token_ids must be (B, T), got shape {tuple(token_ids.shape)}")
        batch, length = token_ids.shape
        if tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask must have the shape of token_ids {(batch, length)}, "
                             f"got {tuple(attention_mask.shape)}")
        if length > cfg.max_position_embeddings:
            raise ValueError(f"{cfg.name} has {cfg.max_position_embeddings} positions; the input "
                             f"has {length} tokens (truncate it)")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(token_ids)
        elif tuple(token_type_ids.shape) != (batch, length):
            raise ValueError(f"token_type_ids must have the shape of token_ids {(batch, length)}, "
                             f"got {tuple(token_type_ids.shape)}")
        if stop_at_layer is not None and not 0 <= stop_at_layer <= cfg.num_layers:
            raise ValueError(f"stop_at_layer must be in [0, {cfg.num_layers}]")
        if peft is not None:
            unknown = [layer for layer in peft.layers if not 0 <= layer < cfg.num_layers]
            if unknown:
                raise ValueError(f"PEFT context names layers {unknown}, but {cfg.name} has "
                                 f"{cfg.num_layers} blocks (0..{cfg.num_layers - 1})")
        model_ssf = peft.ssf if peft is not None else None
        x = BertEmbeddings(cfg, name="embeddings")(token_ids, token_type_ids)
        x = ssf(x, model_ssf, "embed")
        x = _dropout(x, cfg.hidden_dropout, deterministic)
        mask = attention_mask.astype(jnp.int32)
        x, key_mask, num_prompts, blocks = _Encoder(cfg, name="Transformer")(
            x, mask, peft, stop_at_layer, deterministic)
        if stop_at_layer is None:
            x = ssf(x, model_ssf, "final")
        # what the methods read is float32 whatever the compute dtype
        tokens = at_least_f32(x)
        blocks = jax.tree_util.tree_map(at_least_f32, blocks)
        cls = tokens[:, 0]
        if output == "tokens":
            return tokens
        if output == "cls":
            return cls
        # mean over the real tokens: the input mask with the prompt columns zeroed
        pool_mask = jnp.concatenate([mask[:, :1], jnp.zeros((batch, num_prompts), mask.dtype),
                                     mask[:, 1:]], axis=1).astype(tokens.dtype)
        count = jnp.maximum(pool_mask.sum(axis=1, keepdims=True), 1e-9)
        mean = jnp.einsum("btd,bt->bd", tokens, pool_mask) / count
        pooled = cls if cfg.pooling == "cls" else mean
        if output == "mean":
            return mean
        if output == "pooled":
            return pooled
        return {"tokens": tokens, "cls": cls, "mean": mean, "pooled": pooled,
                "num_prompts": num_prompts, "attention_mask": key_mask,
                "pool_mask": pool_mask, "blocks": blocks}


def build(cfg: BertConfig) -> Bert:
    return Bert(cfg)


def init_params(cfg: BertConfig, rng: Array) -> dict:
    """Randomly initialised parameters (a plain nested dict; BERT's N(0, 0.02) init)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    variables = Bert(cfg).init(rng, ids, jnp.ones((1, 2), jnp.int32), output="features")
    return jax.tree_util.tree_map(lambda a: a, dict(variables["params"]))


def apply(cfg: BertConfig, params: Mapping, token_ids: Array, attention_mask: Array,
          peft: Optional[PEFTContext] = None, *, token_type_ids: Optional[Array] = None,
          output: str = "pooled", stop_at_layer: Optional[int] = None,
          deterministic: bool = True, dropout_rng: Optional[Array] = None) -> Any:
    """Functional forward: ``params`` is the frozen tree; trainable pieces come in through
    ``peft``. ``dropout_rng`` is needed when ``deterministic=False`` and a rate is > 0."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return Bert(cfg).apply({"params": params}, token_ids, attention_mask, peft,
                           token_type_ids=token_type_ids, output=output,
                           stop_at_layer=stop_at_layer, deterministic=deterministic, rngs=rngs)


def embed_vectors(cfg: BertConfig, params: Mapping, vectors: Array, positions: Array,
                  token_type: int = 0) -> Array:
    """BERT's embedding layer on vectors of the word-embedding space (soft tokens that are
    not vocabulary rows): ``LN(vectors + position[positions] + token_type[token_type])``
    with the frozen ``params`` -- what the layer computes for a token whose word embedding is
    ``vectors``. ``vectors`` ``(..., L, D)``, ``positions`` int ``(L,)``. No dropout."""
    emb = params["embeddings"]
    x = (vectors + jnp.take(emb["position_embeddings"]["embedding"], positions, axis=0)
         + emb["token_type_embeddings"]["embedding"][token_type])
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps).apply({"params": emb["LayerNorm"]}, x)


def param_count(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


# --------------------------------------------------------------------------------------------
# Hugging Face BERT safetensors -> our tree.
# --------------------------------------------------------------------------------------------

# Tensors a BERT checkpoint may hold that the encoder does not use: the pooler, the
# position_ids buffer, and the pre-training heads of BertForPreTraining / BertForMaskedLM.
_IGNORED_PREFIXES = ("pooler.", "cls.predictions.", "cls.seq_relationship.")
_IGNORED_NAMES = ("embeddings.position_ids", "embeddings.token_type_ids")


def _locate(path: str) -> Tuple[str, str]:
    """(safetensors file, its directory)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"BERT checkpoint path {path} does not exist")
    if os.path.isdir(path):
        file = os.path.join(path, "model.safetensors")
        if not os.path.isfile(file):
            found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if len(found) != 1:
                raise FileNotFoundError(f"{path} holds no model.safetensors "
                                        f"(.safetensors files there: {found})")
            file = os.path.join(path, found[0])
        return file, path
    return path, os.path.dirname(path) or "."


def _st_pooling(directory: str) -> Optional[str]:
    """'mean' / 'cls' from a sentence-transformers ``1_Pooling/config.json``, if present."""
    file = os.path.join(directory, "1_Pooling", "config.json")
    if not os.path.isfile(file):
        return None
    with open(file) as handle:
        conf = json.load(handle)
    modes = [m for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")
             if conf.get(f"pooling_mode_{m}")]
    if modes == ["mean_tokens"]:
        return "mean"
    if modes == ["cls_token"]:
        return "cls"
    raise ValueError(f"{file}: pooling modes {modes} are not supported (only mean or cls)")


def hf_tensor_names(cfg: BertConfig) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """Our flat ``/``-path -> (HF tensor name without prefix, HF shape)."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    names = {
        "embeddings/word_embeddings/embedding": ("embeddings.word_embeddings.weight",
                                                 (cfg.vocab_size, d)),
        "embeddings/position_embeddings/embedding": ("embeddings.position_embeddings.weight",
                                                     (cfg.max_position_embeddings, d)),
        "embeddings/token_type_embeddings/embedding": ("embeddings.token_type_embeddings.weight",
                                                       (cfg.type_vocab_size, d)),
        "embeddings/LayerNorm/scale": ("embeddings.LayerNorm.weight", (d,)),
        "embeddings/LayerNorm/bias": ("embeddings.LayerNorm.bias", (d,)),
    }
    for layer in range(cfg.num_layers):
        src, dst = f"encoder.layer.{layer}", f"Transformer/encoderblock_{layer}"
        linears = {
            "MultiHeadDotProductAttention_1/query": ("attention.self.query", d, d),
            "MultiHeadDotProductAttention_1/key": ("attention.self.key", d, d),
            "MultiHeadDotProductAttention_1/value": ("attention.self.value", d, d),
            "MultiHeadDotProductAttention_1/out": ("attention.output.dense", d, d),
            "MlpBlock_3/Dense_0": ("intermediate.dense", d, i),
            "MlpBlock_3/Dense_1": ("output.dense", i, d),
        }
        for ours, (theirs, d_in, d_out) in linears.items():
            names[f"{dst}/{ours}/kernel"] = (f"{src}.{theirs}.weight", (d_out, d_in))
            names[f"{dst}/{ours}/bias"] = (f"{src}.{theirs}.bias", (d_out,))
        for ours, theirs in (("LayerNorm_0", "attention.output.LayerNorm"),
                             ("LayerNorm_2", "output.LayerNorm")):
            names[f"{dst}/{ours}/scale"] = (f"{src}.{theirs}.weight", (d,))
            names[f"{dst}/{ours}/bias"] = (f"{src}.{theirs}.bias", (d,))
    return names


def _to_ours(path: str, value: np.ndarray, cfg: BertConfig) -> np.ndarray:
    """A torch tensor in our layout: Linear (out, in) -> kernel (in, out), split per head."""
    h, hd, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    attention = "/MultiHeadDotProductAttention_1/"
    if path.endswith("/kernel"):
        value = value.T
        if attention in path and not path.endswith("/out/kernel"):
            return value.reshape(d, h, hd)
        if path.endswith("/out/kernel"):
            return value.reshape(h, hd, d)
        return value
    if attention in path and path.endswith("/bias") and "/out/" not in path:
        return value.reshape(h, hd)
    return value


def load_hf_bert(path: Union[str, os.PathLike], **overrides) -> Tuple[BertConfig, dict]:
    """``(cfg, params)`` from a Hugging Face BERT checkpoint: a directory with
    ``model.safetensors`` and ``config.json``, or the ``.safetensors`` file (``config.json``
    next to it). A ``bert.`` prefix is tolerated; the pooler, the ``position_ids`` buffer and
    pre-training heads are ignored; any other missing, mis-shaped or unexpected tensor is an
    error that names it. A sentence-transformers ``1_Pooling/config.json`` next to the
    weights sets ``pooling``. ``overrides`` set :class:`BertConfig` fields (``name``,
    ``pooling``, ``dtype``, ``attention``, dropout rates). Tensors keep their stored dtype.
    """
    from safetensors.numpy import load_file

    from pecft_jax.backbones.pretrained import CheckpointError, to_jax_tree

    file, directory = _locate(os.fspath(path))
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{file}: no config.json next to it; the number of attention "
                              f"heads (and the LayerNorm eps) cannot be read from the tensors")
    with open(config_path) as handle:
        conf = json.load(handle)
    fields = {}
    pooling = _st_pooling(directory)
    if pooling is not None:
        fields["pooling"] = pooling
    fields.update(overrides)
    try:
        cfg = from_hf_config(conf, **fields)
    except ValueError as err:
        raise CheckpointError(f"{config_path}: {err}") from err

    tensors = load_file(file)
    prefix = "bert." if any(k.startswith("bert.embeddings.") for k in tensors) else ""
    expected = hf_tensor_names(cfg)
    missing, misshaped, flat = [], [], {}
    for ours, (theirs, shape) in expected.items():
        key = prefix + theirs
        if key not in tensors:
            missing.append(key)
        elif tuple(tensors[key].shape) != shape:
            misshaped.append(f"{key} {tuple(tensors[key].shape)} (expected {shape})")
        else:
            flat[ours] = _to_ours(ours, np.asarray(tensors[key]), cfg)
    used = {prefix + theirs for theirs, _ in expected.values()}

    def ignored(key: str) -> bool:
        bare = key[len(prefix):] if key.startswith(prefix) else key
        return bare.startswith(_IGNORED_PREFIXES) or bare in _IGNORED_NAMES

    unexpected = sorted(k for k in tensors if k not in used and not ignored(k))
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}" + (f" (+{len(missing) - 8} more)"
                                                            if len(missing) > 8 else ""))
    if misshaped:
        problems.append(f"mis-shaped tensors {misshaped[:8]}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}" + (
            f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else "")
            + " -- not a plain BERT encoder of this config")
    if problems:
        raise CheckpointError(f"{file} does not load as {cfg.name} "
                              f"(config.json: {cfg.num_layers} layers, hidden "
                              f"{cfg.hidden_size}): " + "; ".join(problems))
    return cfg, to_jax_tree(flat)
