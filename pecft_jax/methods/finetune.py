"""Sequential fine-tuning: the lower bound (and, with ``scenario.joint=True``, the upper one).

``mode`` picks what is trained besides the linear head over all classes:

* ``'full'``    -- the whole backbone (its copy becomes part of the trainable tree; give it
  its own learning rate with ``train.lr_mults``, e.g. ``[('^backbone/', 0.01)]``);
* ``'head'``    -- nothing but the head (a linear probe on frozen features);
* ``'lora'``, ``'adapter'``, ``'ssf'``, ``'prompt'`` -- that PEFT module
  (``method.lora`` / ``.adapter`` / ``.ssf`` / ``.prompt``, see :mod:`pecft_jax.peft.modules`).

One set of parameters is shared by all tasks and simply keeps training, which is what makes
this the forgetting baseline.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import jax

from pecft_jax import peft
from pecft_jax.methods.base import (Method, TaskSpec, apply_linear_head, config_field,
                                    init_linear_head)
from pecft_jax.peft.modules import MODULE_KINDS, init_module, module_context

MODES = ("full", "head") + MODULE_KINDS


class Finetune(Method):
    name = "finetune"
    # Sequential fine-tuning trains over the logits of every class seen so far.
    train_class_mask = "seen"

    @dataclasses.dataclass(frozen=True)
    class Config:
        mode: str = "full"
        lora: peft.LoraConfig = config_field(
            lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=("query", "value")))
        adapter: peft.AdapterConfig = config_field(  # AdaptFormer's parallel adapter
            lambda: peft.AdapterConfig(bottleneck_dim=16, mode="parallel", scale=0.1))
        ssf: peft.SSFConfig = config_field(peft.SSFConfig)
        prompt: peft.PromptConfig = config_field(lambda: peft.PromptConfig(length=10))

        def __post_init__(self):
            if self.mode not in MODES:
                raise ValueError(f"unknown finetune mode {self.mode!r}; use one of {MODES}")

    def __init__(self, config, backbone, num_classes, num_tasks):
        super().__init__(config, backbone, num_classes, num_tasks)
        mode = self.config.mode
        self.module = mode if mode in MODULE_KINDS else None
        self.module_cfg = getattr(self.config, mode) if self.module else None

    def init(self, rng, frozen) -> Tuple[dict, dict]:
        k_head, k_peft = jax.random.split(rng)
        trainable = {"head": init_linear_head(k_head, self.backbone.feature_dim,
                                              self.num_classes)}
        if self.config.mode == "full":
            trainable["backbone"] = jax.tree_util.tree_map(lambda x: x.copy(), dict(frozen))
        elif self.module:
            trainable["peft"] = init_module(self.module, self.module_cfg, self.backbone.config,
                                            k_peft)
        return trainable, {}

    def features(self, trainable, frozen, images, deterministic=True, rng=None):
        params = trainable["backbone"] if self.config.mode == "full" else frozen
        context = (module_context(self.module, self.module_cfg, trainable["peft"])
                   if self.module else None)
        return self.backbone.apply(params, images, context, output="pre_logits",
                                   deterministic=deterministic, dropout_rng=rng)

    def loss(self, trainable, state, frozen, batch, rng, task: TaskSpec):
        logits = apply_linear_head(trainable["head"],
                                   self.features(trainable, frozen, batch["inputs"],
                                                 deterministic=False, rng=rng))
        loss = self.masked_ce(logits, batch, task)
        return loss, {"metrics": {"accuracy": self.train_accuracy(logits, batch, task)}}

    def logits(self, trainable, state, frozen, batch, task):
        return apply_linear_head(trainable["head"],
                                 self.features(trainable, frozen, batch["inputs"]))
