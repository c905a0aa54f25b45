"""LAE: Learning-Accumulation-Ensemble (Gao et al., "A Unified Continual Learning Framework
with General Parameter-Efficient Tuning", ICCV 2023; official code gqk/LAE, ``main.py``,
``libml/model/pet/``, ``config/vit_{adapter,lora,prefix}.yaml``).

One parameter-efficient module in blocks 0-4, of one of three kinds (``module``), each with
learnable output scales that start at 1:

* ``'adapter'``: a bottleneck of 5 beside the attention, reading its input (LN1's output),
  ``s (W_up gelu(W_down x + b) + b_up)`` added to the attention output;
* ``'lora'``: rank 5 on the key and value projections, ``s_k B_k A_k`` and ``s_v B_v A_v``;
* ``'prefix'``: 10 key and 10 value vectors (``U(0, 0.01)``, times ``s_k`` / ``s_v``) joined
  to the projected keys and values, with the official compensation: the prefix columns of
  the attention are divided by their sum ``lambda``, i.e. ``(1 - lambda) Attn(x) + Attn_prefix``.

Per task (the algorithm of the paper, as its code runs it):

* **Learning.** The *online* module and a linear head (one per task, ``N(0, 0.001^2)``,
  bias 0) learn the task by cross-entropy over its classes (Adam, no weight decay, constant
  rate). From the second task on, the module is frozen for the first ``freeze_epochs``
  epochs (3 of 5 on CIFAR-100, 30 of 50 on ImageNet-R) while only the head learns -- the
  calibration of the new head before the module adapts; its Adam state starts when it
  unfreezes (``Method.group_start_epochs``).
* **Accumulation.** From the second task on, after every optimizer step the *offline*
  module moves towards the online one, ``theta_off <- 0.9999 theta_off + 0.0001 theta_on``
  (starting as a copy of the online module at the start of the second task).
* **Ensemble.** Prediction: ``argmax_c max(softmax_c(f_on(x)), softmax_c(f_off(x)))`` over
  the seen classes, the two experts sharing the head (the online expert alone after the
  first task). ``logits`` returns the log of that maximum.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp

from pecft_jax import peft
from pecft_jax.methods.base import (Method, TaskSpec, apply_linear_head, count_params,
                                    mask_task_columns)

Array = jax.Array
MODULES = ("adapter", "lora", "prefix")


class LAE(Method):
    name = "lae"
    scores_unlearnt_classes = False  # logits: log-softmax over the seen classes only
    train_class_mask = "task"  # the official loss: the current task's logits only

    @dataclasses.dataclass(frozen=True)
    class Config:
        module: str = "adapter"                  # config/vit_{adapter,lora,prefix}.yaml
        layers: Tuple[int, ...] = (0, 1, 2, 3, 4)  # official adapt_blocks
        adapter_bottleneck: int = 5              # vit_adapter.yaml: down_sample 5
        lora_rank: int = 5                       # vit_lora.yaml: rank 5
        prefix_length: int = 10                  # vit_prefix.yaml: length 10
        ema_decay: float = 0.9999                # base configs: ema_decay
        freeze_epochs: int = 3                   # cifar100_order1.yaml (ImageNet-R: 30)
        head_init_std: float = 0.001             # head/simple.py: N(0, 0.001^2), bias 0

        def __post_init__(self):
            if self.module not in MODULES:
                raise ValueError(f"lae module must be one of {MODULES}, got {self.module!r}")
            if not 0.0 <= self.ema_decay < 1.0:
                raise ValueError(f"lae ema_decay must be in [0, 1), got {self.ema_decay}")
            if self.freeze_epochs < 0:
                raise ValueError(f"lae freeze_epochs must be >= 0, got {self.freeze_epochs}")

    def __init__(self, config, backbone, num_classes, num_tasks):
        super().__init__(config, backbone, num_classes, num_tasks)
        c = self.config
        layers = tuple(c.layers)
        if c.module == "adapter":
            self.module_cfg = peft.AdapterConfig(
                bottleneck_dim=c.adapter_bottleneck, mlp=False, attn=True, attn_mode="parallel",
                activation="gelu", layers=layers)
        elif c.module == "lora":
            self.module_cfg = peft.LoraConfig(r=c.lora_rank, lora_alpha=c.lora_rank,
                                              target_modules=("key", "value"), layers=layers)
        else:
            self.module_cfg = peft.PrefixConfig(length=c.prefix_length, layers=layers,
                                                init="small_uniform", compensated=True)

    # ------------------------------------------------------------------ set-up
    def init(self, rng, frozen):
        k_module, k_head = jax.random.split(rng)
        cfg, c = self.backbone.config, self.config
        if c.module == "adapter":
            params = peft.init_adapters(cfg, self.module_cfg, k_module)
            scales = {layer: jnp.ones((), jnp.float32) for layer in params}
        elif c.module == "lora":
            params = peft.init_lora(cfg, self.module_cfg, k_module)
            scales = {layer: {t: jnp.ones((), jnp.float32) for t in targets}
                      for layer, targets in params.items()}
        else:
            params = peft.init_prefixes(cfg, self.module_cfg, k_module)
            scales = {layer: jnp.ones((2,), jnp.float32) for layer in params}  # key, value
        pet = {"params": params, "scale": scales}
        head = {"kernel": c.head_init_std * jax.random.normal(
                    k_head, (self.backbone.feature_dim, self.num_classes), jnp.float32),
                "bias": jnp.zeros((self.num_classes,), jnp.float32)}
        # the offline module: a copy of the online one from the second task on
        return {"pet": pet, "head": head}, {"offline": jax.tree_util.tree_map(jnp.array, pet)}

    def before_task(self, task, trainable, state, frozen, data, rng):
        if task.index == 1:  # official: ModelEmaV2(pets) built at the start of task 1
            state = dict(state, offline=jax.tree_util.tree_map(jnp.array, trainable["pet"]))
        return trainable, state

    # --------------------------------------------------------------- optimiser
    def param_labels(self, trainable, task):
        return {"pet": jax.tree_util.tree_map(lambda _: "pet", trainable["pet"]),
                "head": jax.tree_util.tree_map(lambda _: "head", trainable["head"])}

    def optimizer_groups(self, task, base):
        return {"pet": base, "head": base}  # one learning rate (official optimizer.py)

    def group_start_epochs(self, task):
        """From the second task on the module waits ``freeze_epochs`` epochs (the head learns
        alone); its Adam state starts then."""
        return {"pet": self.config.freeze_epochs} if task.index > 0 else {}

    def update_mask(self, trainable, task):
        return {"pet": jax.tree_util.tree_map(lambda _: jnp.float32(1), trainable["pet"]),
                "head": mask_task_columns(trainable["head"], task)}

    def update(self, trainable, state, opt_state, frozen, batch, rng, task, optimizer):
        """The online step, then the offline module's EMA towards it (from the second task
        on, after every step: ``theta_off <- d theta_off + (1 - d) theta_on``)."""
        trainable, state, opt_state, metrics = super().update(
            trainable, state, opt_state, frozen, batch, rng, task, optimizer)
        d = self.config.ema_decay
        accumulate = task.index > 0
        offline = jax.tree_util.tree_map(
            lambda off, on: jnp.where(accumulate, d * off + (1.0 - d) * on, off),
            state["offline"], trainable["pet"])
        return trainable, dict(state, offline=offline), opt_state, metrics

    # ------------------------------------------------------------------ traced
    def context(self, pet):
        """The backbone context of a module, its learnable scales folded in."""
        c, params, scale = self.config, pet["params"], pet["scale"]
        if c.module == "adapter":
            scaled = {layer: {"attn": {"down": p["attn"]["down"], "up": jax.tree_util.tree_map(
                          lambda w, s=scale[layer]: s * w, p["attn"]["up"])}}
                      for layer, p in params.items()}
            return peft.adapter_context(scaled, self.module_cfg)
        if c.module == "lora":
            scaled = {layer: {t: {"A": f["A"], "B": scale[layer][t] * f["B"]}
                              for t, f in targets.items()} for layer, targets in params.items()}
            return peft.lora_context(scaled, self.module_cfg)
        scaled = {layer: scale[layer][:, None, None] * p for layer, p in params.items()}
        return peft.prefix_context(scaled, self.module_cfg)

    def expert_logits(self, pet, head, frozen, images):
        return apply_linear_head(head, self.backbone.apply(frozen, images, self.context(pet),
                                                           output="cls"))

    def loss(self, trainable, state, frozen, batch, rng, task: TaskSpec):
        logits = self.expert_logits(trainable["pet"], trainable["head"], frozen, batch["inputs"])
        ce = self.masked_ce(logits, batch, task)
        return ce, {"metrics": {"accuracy": self.train_accuracy(logits, batch, task)}}

    def logits(self, trainable, state, frozen, batch, task):
        """``log max(softmax(online), softmax(offline))`` over the seen classes (the online
        expert alone after the first task)."""
        seen = jnp.asarray(task.class_mask("seen"))
        online = self.expert_logits(trainable["pet"], trainable["head"], frozen, batch["inputs"])
        log_p = lambda z: jax.nn.log_softmax(jnp.where(seen, z, -jnp.inf), axis=-1)
        # the offline expert exists from the second task on: no pass for it before
        return jax.lax.cond(
            task.index > 0,
            lambda: jnp.maximum(log_p(online), log_p(self.expert_logits(
                state["offline"], trainable["head"], frozen, batch["inputs"]))),
            lambda: log_p(online))

    def count_trainable(self, trainable, state):
        return count_params(trainable)
