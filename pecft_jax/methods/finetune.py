"""Sequential fine-tuning (the lower bound) and joint training (the upper bound).

``mode`` picks what is trained besides the linear head over all classes:

* ``'full'``    -- the whole backbone (its copy becomes part of the trainable tree);
* ``'head'``    -- nothing but the head (a linear probe on frozen features);
* ``'lora'``    -- LoRA factors (``method.lora``: r, lora_alpha, target_modules);
* ``'adapter'`` -- bottleneck adapters (``method.adapter``: bottleneck_dim, mode, scale);
* ``'prompt'``  -- prompt tuning (``method.prompt``: length, deep).

One set of PEFT parameters is shared by all tasks and simply keeps training, which is what
makes this the forgetting baseline.
"""
from __future__ import annotations

from typing import Tuple

import jax

from pecft_jax import peft
from pecft_jax.methods.base import (Method, TaskSpec, apply_linear_head,
                                    init_linear_head)

MODES = ("full", "head", "lora", "adapter", "prompt")
# Used where the config's method.lora / .adapter / .prompt sections leave a field out.
LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "target_modules": ("query", "value")}
ADAPTER_DEFAULTS = {"bottleneck_dim": 16, "mode": "parallel", "scale": 0.1}  # AdaptFormer
PROMPT_DEFAULTS = {"length": 10, "deep": False}


class Finetune(Method):
    name = "finetune"
    # Sequential fine-tuning trains over the logits of every class seen so far.
    train_class_mask = "seen"

    def __init__(self, config, backbone, num_classes, num_tasks):
        super().__init__(config, backbone, num_classes, num_tasks)
        self.mode = config.get("mode", "full")
        if self.mode not in MODES:
            raise ValueError(f"unknown finetune mode {self.mode!r}; use one of {MODES}")
        vit_cfg = backbone.config

        def options(section, defaults):
            return {**defaults, **dict(config.get(section, {}))}

        if self.mode == "lora":
            self.peft_cfg = peft.LoraConfig(**options("lora", LORA_DEFAULTS))
        elif self.mode == "adapter":
            self.peft_cfg = peft.AdapterConfig(**options("adapter", ADAPTER_DEFAULTS))
        elif self.mode == "prompt":
            self.peft_cfg = peft.PromptConfig(**options("prompt", PROMPT_DEFAULTS))
        self._vit_cfg = vit_cfg

    def init(self, rng, frozen) -> Tuple[dict, dict]:
        k_head, k_peft = jax.random.split(rng)
        trainable = {"head": init_linear_head(k_head, self.backbone.feature_dim,
                                              self.num_classes)}
        if self.mode == "full":
            trainable["backbone"] = jax.tree_util.tree_map(lambda x: x.copy(), dict(frozen))
        elif self.mode == "lora":
            trainable["peft"] = peft.init_lora(self._vit_cfg, self.peft_cfg, k_peft)
        elif self.mode == "adapter":
            trainable["peft"] = peft.init_adapters(self._vit_cfg, self.peft_cfg, k_peft)
        elif self.mode == "prompt":
            trainable["peft"] = peft.init_prompts(self._vit_cfg, self.peft_cfg, k_peft)
        return trainable, {}

    def _context(self, trainable):
        if self.mode == "lora":
            return peft.lora_context(trainable["peft"], self.peft_cfg)
        if self.mode == "adapter":
            return peft.adapter_context(trainable["peft"], self.peft_cfg)
        if self.mode == "prompt":
            return peft.prompt_context(trainable["peft"], self.peft_cfg)
        return None

    def features(self, trainable, frozen, images, deterministic=True, rng=None):
        params = trainable["backbone"] if self.mode == "full" else frozen
        return self.backbone.apply(params, images, self._context(trainable), output="pre_logits",
                                   deterministic=deterministic, dropout_rng=rng)

    def loss(self, trainable, state, frozen, batch, rng, task: TaskSpec):
        logits = apply_linear_head(trainable["head"],
                                   self.features(trainable, frozen, batch["image"],
                                                 deterministic=False, rng=rng))
        loss = self.masked_ce(logits, batch["label"], task)
        return loss, {"metrics": {"accuracy": self.train_accuracy(logits, batch["label"], task)}}

    def logits(self, trainable, state, frozen, images, task):
        return apply_linear_head(trainable["head"], self.features(trainable, frozen, images))


class Joint(Finetune):
    """All tasks' data in one task: the upper bound (one row of results)."""
    name = "joint"
    joint = True
    train_class_mask = "all"
