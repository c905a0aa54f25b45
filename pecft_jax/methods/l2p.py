"""L2P: Learning to Prompt for Continual Learning (Wang et al., CVPR 2022).

Algorithm (paper Alg. 1, official code's defaults in brackets):

* a pool of M prompts P_i (length L_p) with learnable keys k_i  [M=10, L_p=5];
* query q(x) = the frozen pretrained model's [CLS] feature (no prompts, no gradient);
* pick the top-N keys by cosine similarity to q(x)  [N=5]; optionally batch-wise (the N
  ids most often chosen in the batch are used for every example) and, while training,
  a diversity penalty that divides by previous tasks' selection frequencies;
* prepend the N selected prompts (N*L_p tokens) to the input tokens;
* classify the mean of the prompt tokens' outputs with a linear head over all classes;
* loss = CE over the current task's classes (other logits masked)
         + lambda * sum_selected (1 - cos(q(x), k_i))  [lambda = 0.1].

Options of the official code's 5-datasets config: ``use_prompt_mask`` -- in training, task t
uses (and pulls the keys of) pool entries tN .. (t+1)N-1 for every example instead of the
similarity choice; ``shared_prompt_pool`` -- those entries start as a copy of task t-1's.

Trainable: prompts, keys and the head. Everything of the backbone stays frozen.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pecft_jax.methods.base import (Method, TaskSpec, apply_linear_head,
                                    init_linear_head)
from pecft_jax.methods.common import batchwise_vote_groups, frozen_query
from pecft_jax.peft import prompt_pool
from pecft_jax.backbones.context import LayerPEFT, PEFTContext


class L2P(Method):
    name = "l2p"
    uses_frozen_query = True
    train_class_mask = "task"

    @dataclasses.dataclass(frozen=True)
    class Config:
        pool_size: int = 10           # M
        prompt_length: int = 5        # L_p
        top_k: int = 5                # N
        pull_constraint: float = 0.1  # lambda
        batchwise_prompt: bool = False
        # examples per batch-wise vote: the official code votes within each device's batch
        # (16 for L2P, 24 for DualPrompt); 0 = over the whole batch
        batchwise_group: int = 0
        diversity_penalty: bool = False
        prompt_init: str = "uniform"
        key_init: str = "uniform"
        head_init: str = "torch_linear"  # base.HEAD_INITS
        # 'prompt': mean of the prompt tokens' outputs (the paper's); 'cls': the [CLS] output
        head_input: str = "prompt"
        # official use_prompt_mask: training on task t uses pool entries [tN, (t+1)N) for every
        # example (the similarity choice where (t+1)N > M, as the official code drops the mask)
        use_prompt_mask: bool = False
        # official shared_prompt_pool: entries [tN, (t+1)N) start as a copy of [(t-1)N, tN)
        # at task t > 0 (keys keep their own; where (t+1)N <= M)
        shared_prompt_pool: bool = False

        def __post_init__(self):
            if self.head_input not in ("prompt", "cls"):
                raise ValueError(f"l2p head_input must be 'prompt' or 'cls', got "
                                 f"{self.head_input!r}")
            if self.batchwise_group < 0:
                raise ValueError(f"l2p batchwise_group must be >= 0 (0 = the whole batch), got "
                                 f"{self.batchwise_group}")
            if not 0 < self.top_k <= self.pool_size:
                raise ValueError(f"l2p top_k={self.top_k} must be in [1, "
                                 f"pool_size={self.pool_size}]")

    @property
    def predictions_depend_on_batch(self) -> bool:
        return self.config.batchwise_prompt

    @property
    def batch_groups(self) -> Mapping[str, Tuple[int, str]]:
        return batchwise_vote_groups(self.config)

    def init(self, rng, frozen):
        c = self.config
        k_pool, k_head = jax.random.split(rng)
        pool = prompt_pool.init_pool(c.pool_size, c.prompt_length, self.backbone.feature_dim,
                                     k_pool, key_init=c.key_init, prompt_init=c.prompt_init)
        trainable = {"prompts": pool["prompts"], "keys": pool["keys"],
                     "head": init_linear_head(k_head, self.backbone.feature_dim, self.num_classes,
                                              c.head_init)}
        state = {"task_counts": jnp.zeros((c.pool_size,), jnp.float32),
                 "previous_counts": jnp.zeros((c.pool_size,), jnp.float32)}
        return trainable, state

    def before_task(self, task, trainable, state, frozen, data, rng):
        n, t = self.config.top_k, task.index
        if self.config.shared_prompt_pool and 0 < t and (t + 1) * n <= self.config.pool_size:
            prompts = np.array(trainable["prompts"])  # a host-side copy: compiles nothing
            prompts[t * n:(t + 1) * n] = prompts[(t - 1) * n:t * n]
            trainable = dict(trainable, prompts=prompts)
        # Selection frequencies of earlier tasks drive the (optional) diversity penalty
        # (whole-number counts: exact in numpy, on the host, compiling nothing).
        task_counts = np.asarray(state["task_counts"])
        return trainable, {"task_counts": np.zeros_like(task_counts),
                           "previous_counts": np.asarray(state["previous_counts"]) + task_counts}

    def _forward(self, trainable, state, frozen, batch, train: bool, task=None):
        images = batch["inputs"]
        q = frozen_query(self.backbone, frozen, batch)
        similarity = prompt_pool.cosine_similarity(q, trainable["keys"])
        c = self.config
        penalty = state["previous_counts"] if (train and c.diversity_penalty) else None
        idx = prompt_pool.select_topk(similarity, c.top_k, frequency_penalty=penalty,
                                      batchwise_prompt=c.batchwise_prompt,
                                      group_size=c.batchwise_group,
                                      weights=batch.get("mask"))
        if train and c.use_prompt_mask:  # the task's own entries (the index may be traced)
            own = task.index * c.top_k + jnp.arange(c.top_k, dtype=idx.dtype)
            fits = (task.index + 1) * c.top_k <= c.pool_size
            idx = jnp.where(fits, jnp.broadcast_to(own, idx.shape), idx)
        prompts = prompt_pool.gather_prompts(trainable["prompts"], idx)
        context = PEFTContext({0: LayerPEFT(prompt=prompts)})
        tokens = self.backbone.apply(frozen, images, context, output="tokens")
        if c.head_input == "prompt":
            feature = tokens[:, 1:1 + prompts.shape[1]].mean(axis=1)
        else:
            feature = tokens[:, 0]
        return apply_linear_head(trainable["head"], feature), q, idx

    def loss(self, trainable, state, frozen, batch, rng, task: TaskSpec):
        logits, q, idx = self._forward(trainable, state, frozen, batch, train=True, task=task)
        ce = self.masked_ce(logits, batch, task)
        mask = batch.get("mask")  # a kept partial batch's padding neither pulls nor counts
        matching = prompt_pool.key_matching_loss(q, trainable["keys"], idx, mask)
        counts = prompt_pool.selection_counts(idx, self.config.pool_size,
                                              mask).astype(jnp.float32)
        new_state = dict(state, task_counts=state["task_counts"] + counts)
        return ce + self.config.pull_constraint * matching, {
            "metrics": {"ce": ce, "key_matching": matching,
                        "accuracy": self.train_accuracy(logits, batch, task)},
            "state": new_state}

    def logits(self, trainable, state, frozen, batch, task):
        return self._forward(trainable, state, frozen, batch, train=False)[0]
