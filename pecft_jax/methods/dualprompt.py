"""DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning (Wang et al.,
ECCV 2022).

Algorithm (paper Sec. 4, official code's defaults in brackets):

* a G(eneral)-prompt shared by all tasks, attached by prefix tuning to the first blocks
  [layers 0-1, length L_g=5: 5 key + 5 value tokens per layer];
* an E(xpert)-prompt pool with one prefix prompt and one learnable key per task
  [pool size = number of tasks, layers 2-4, length L_e=5 on CIFAR-100, 20 on ImageNet-R];
* query q(x) = the frozen pretrained model's [CLS] feature;
* training on task t: E-prompt t is used (the task identity is known) and its key k_t is
  pulled towards the query: loss = CE over task t's classes (other logits masked)
  + lambda * mean_x (1 - cos(q(x), k_t))  [lambda = 1];
* test: the E-prompt whose key is most cosine-similar to q(x) is used (top-1);
* classifier: a linear head on the prompted model's [CLS] output (``head_type='token'``);
* the E-prompt of a new task starts as a copy of the previous task's (official
  ``shared_prompt_pool=True``; its key keeps its own initialisation).

Trainable: G-prompt, E-prompt pool, keys, head. Only E-prompt t and key t receive gradients
while task t trains; the optimiser is fresh per task, so the other entries stay bit-identical.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pecft_jax.methods.base import (Method, TaskSpec, apply_linear_head,
                                    init_linear_head)
from pecft_jax.methods.common import (batchwise_vote_groups, frozen_query, num_examples,
                                      prompted_cls_token)
from pecft_jax.peft import prompt_pool
from pecft_jax.backbones.context import resolve_layers
from pecft_jax.peft.prompts import PrefixConfig, init_prefixes, prefix_context


def _layers(value, num_layers: int, what: str) -> tuple:
    """Config layers (possibly empty: no prompt of that kind) as a sorted tuple."""
    if value is None or (not isinstance(value, int) and len(value) == 0):
        return ()
    return resolve_layers(value, num_layers, what)


class DualPrompt(Method):
    name = "dualprompt"
    train_class_mask = "task"  # official train_mask=True
    infers_task = True
    uses_frozen_query = True

    @dataclasses.dataclass(frozen=True)
    class Config:
        g_prompt_length: int = 5                         # L_g
        e_prompt_length: int = 5                         # L_e (20 on ImageNet-R)
        g_layers: Tuple[int, ...] = (0, 1)               # () = no G-prompt
        e_layers: Tuple[int, ...] = (2, 3, 4)
        pool_size: Optional[int] = None                  # None = the number of tasks
        pull_constraint: float = 1.0                     # lambda
        batchwise_prompt: bool = False
        # examples per batch-wise vote: the official code votes within each device's batch
        # (16 for L2P, 24 for DualPrompt); 0 = over the whole batch
        batchwise_group: int = 0
        prompt_init: str = "uniform"
        key_init: str = "uniform"
        head_init: str = "torch_linear"  # base.HEAD_INITS
        shared_prompt_pool: bool = True

        def __post_init__(self):
            if self.batchwise_group < 0:
                raise ValueError(f"dualprompt batchwise_group must be >= 0 (0 = the whole "
                                 f"batch), got {self.batchwise_group}")
            if not self.e_layers:
                raise ValueError("dualprompt e_layers is empty: the E-prompt needs at least "
                                 "one block")
            overlap = sorted(set(self.g_layers or ()) & set(self.e_layers))
            if overlap:
                raise ValueError(f"dualprompt g_layers and e_layers overlap at blocks {overlap}; "
                                 f"give each block to one prompt (paper: G at 0-1, E at 2-4)")

    def __init__(self, config, backbone, num_classes, num_tasks):
        super().__init__(config, backbone, num_classes, num_tasks)
        c, depth = self.config, backbone.config.num_layers
        self.g_layers = _layers(c.g_layers, depth, "dualprompt g_layers")
        self.e_layers = _layers(c.e_layers, depth, "dualprompt e_layers")
        self.pool_size = int(c.pool_size) if c.pool_size else num_tasks
        if self.pool_size < num_tasks:
            raise ValueError(f"dualprompt pool_size={self.pool_size} is smaller than the number "
                             f"of tasks ({num_tasks}): training uses E-prompt t for task t; set "
                             f"method.pool_size >= {num_tasks} (or leave it unset)")
        self.g_cfg = PrefixConfig(length=c.g_prompt_length, layers=self.g_layers or None,
                                  init=c.prompt_init)

    # ------------------------------------------------------------------ set-up
    def init(self, rng, frozen):
        c = self.config
        k_g, k_e, k_key, k_head = jax.random.split(rng, 4)
        dim = self.backbone.feature_dim
        trainable = {
            "g_prompt": (init_prefixes(self.backbone.config, self.g_cfg, k_g)
                         if self.g_layers else {}),
            # one (pool, 2, L_e, D) prefix pool per E-layer; the keys are shared by the layers
            "e_prompt": {str(layer): prompt_pool.init_pool(
                self.pool_size, c.e_prompt_length, dim, jax.random.fold_in(k_e, layer),
                prompt_init=c.prompt_init, key_init=c.key_init, prefix=True)["prompts"]
                for layer in self.e_layers},
            "e_keys": prompt_pool.init_pool(self.pool_size, 1, dim, k_key,
                                            key_init=c.key_init)["keys"],
            "head": init_linear_head(k_head, dim, self.num_classes, c.head_init),
        }
        return trainable, {}

    def before_task(self, task, trainable, state, frozen, data, rng):
        t = task.index
        if self.config.shared_prompt_pool and 0 < t < self.pool_size:
            # official shared_prompt_pool: E-prompt t starts from the learned E-prompt t-1
            pools = {}
            for layer, pool in trainable["e_prompt"].items():
                pools[layer] = np.array(pool)  # a host-side copy: compiles nothing
                pools[layer][t] = pools[layer][t - 1]
            trainable = dict(trainable, e_prompt=pools)
        return trainable, state

    # ------------------------------------------------------------ the forward
    def context(self, trainable, idx):
        """The backbone context: G-prefixes (shared) + the E-prefixes of the pool entries
        ``idx`` (B, 1) at each E-layer, ``(B, 2, L_e, D)``."""
        e = {layer: prompt_pool.gather_prompts(pool, idx)
             for layer, pool in trainable["e_prompt"].items()}
        ctx = prefix_context(e)
        if trainable["g_prompt"]:
            ctx = prefix_context(trainable["g_prompt"]).merge(ctx)
        return ctx

    def select(self, trainable, q, mask=None):
        """Test-time E-prompt choice: the top-1 key by cosine similarity, ``(B, 1)``
        (batch-wise: the batch's majority, real rows voting)."""
        similarity = prompt_pool.cosine_similarity(q, trainable["e_keys"])
        return prompt_pool.select_topk(similarity, 1,
                                       batchwise_prompt=self.config.batchwise_prompt,
                                       group_size=self.config.batchwise_group,
                                       weights=mask)

    @property
    def predictions_depend_on_batch(self) -> bool:
        return self.config.batchwise_prompt

    @property
    def batch_groups(self) -> Mapping[str, Tuple[int, str]]:
        return batchwise_vote_groups(self.config)

    def _logits(self, trainable, frozen, images, idx):
        feature = prompted_cls_token(self.backbone, frozen, images, self.context(trainable, idx))
        return apply_linear_head(trainable["head"], feature)

    def loss(self, trainable, state, frozen, batch, rng, task: TaskSpec):
        images = batch["inputs"]
        q = frozen_query(self.backbone, frozen, batch)
        idx = jnp.full((num_examples(images), 1), task.index, jnp.int32)  # the true task's E-prompt
        logits = self._logits(trainable, frozen, images, idx)
        ce = self.masked_ce(logits, batch, task)
        mask = batch.get("mask")  # a kept partial batch's padding
        matching = prompt_pool.key_matching_loss(q, trainable["e_keys"], idx, mask)
        chosen = self.select(jax.lax.stop_gradient(trainable), q, mask)
        identified = (chosen[:, 0] == task.index).astype(jnp.float32)
        return ce + self.config.pull_constraint * matching, {
            "metrics": {"ce": ce, "key_matching": matching,
                        "accuracy": self.train_accuracy(logits, batch, task),
                        "task_identity": prompt_pool.batch_mean(identified, mask)}}

    def logits(self, trainable, state, frozen, batch, task):
        idx = self.select(trainable, frozen_query(self.backbone, frozen, batch),
                          batch.get("mask"))
        return self._logits(trainable, frozen, batch["inputs"], idx), idx[:, 0]
