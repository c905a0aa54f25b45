"""A frozen backbone as the continual loop sees it: architecture + input normalisation.

The parameters themselves are *not* stored here: they are a separate (frozen) pytree that
the loop places on the devices and passes into every jit-compiled step as an argument, so
it is never baked into a compiled program as a constant and never reaches ``jax.grad``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax

from pecft_jax.backbones import vit

# The package's own demo backbone (pretrained by experiments/pretrain_demo_backbone.py).
DEMO_BACKBONE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets",
                             "vit_demo7_fashion_mnist.safetensors")


@dataclasses.dataclass(frozen=True)
class Backbone:
    config: vit.ViTConfig
    mean: Sequence[float] = (0.5,)
    std: Sequence[float] = (0.5,)

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
        return vit.apply(self.config, params, images, peft, **kwargs)


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
