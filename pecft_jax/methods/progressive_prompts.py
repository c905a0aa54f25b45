"""Progressive Prompts (Razdaibiedina et al., ICLR 2023), on a BERT-family text encoder.

The official code (arazd/ProgressivePrompts @01572d6, ``BERT_codebase/``: ``model_utils.py``
MU, ``continual_learning_utils.py`` CLU, ``dataset_utils.py`` DU) and the paper:

* task ``t`` learns a soft prompt ``P_t`` of ``L`` tokens [10] in the word-embedding space:
  its first token starts as a copy of the [CLS] embedding, the others as copies of random
  vocabulary rows (MU:197-208);
* every prompt goes through BERT's embedding layer like a word (word + position + type 0,
  LayerNorm, dropout); position ids: 0 for the first token of every prompt, ``seq_len + 1``
  onward for the others, counting on across the prompts (CLU:313-324);
* the residual reparameterisation: the current prompt's embedded tokens ``e`` become
  ``e + MLP_t(e)``, ``MLP = Linear(D, 800) -> ReLU -> Linear(800, D)`` (``residual_MLP1``,
  CLU:14-70, MU:390-394), one MLP per task;
* the input is the text without its [CLS] token followed by the frozen prompts of the earlier
  tasks and ``P_t``: ``[x; P_0; ...; P_t]`` (DU:112-129, CLU:199), plain bidirectional
  attention over all of it;
* task ``t``'s head reads the output at ``P_t``'s first token (MU:400, CLU:379-380): dropout
  -> Linear(D, D) -> tanh -> dropout -> Linear(D, n_t) (adapter-transformers'
  ``ClassificationHead``), one head per task, the earlier ones frozen (CLU:430-437);
* loss: cross-entropy of task ``t``'s head over its classes; only ``P_t``, ``MLP_t`` and
  head ``t`` learn (the backbone and every earlier prompt stay exact, MU:411-426); dropout
  on in the frozen encoder while training (``model.train()``, CLU:386);
* test: task ``j``'s examples are classified by head ``j`` with prompts ``0..j``
  (task-incremental, CLU:255-271), so a task's accuracy never changes once learnt.

Where this differs, and why:
* After task ``t`` its prompt is kept as what the encoder received -- embedded, through
  ``MLP_t``, without dropout -- and the MLP is discarded, as the paper describes and its T5
  code does (``t5_continual.py:324-333``). The BERT code keeps every MLP and applies it only
  to the prompt of the task under test, so later tasks see earlier prompts *without* their
  MLPs (MU:390-394, 578-580). (Its shipped script ``run_prog_prompts.sh`` runs no MLP at
  all: ``method.residual_mlp=False`` is that setting.)
* Layout: the sequence here is ``[CLS, P_0 .. P_t, x]`` with the text's [CLS] masked out of
  the attention: with the official position ids every token's embedding is the official
  one, and BERT attention does not depend on where a token sits in the sequence, so the
  outputs are the official layout's. The sequence grows by ``L`` tokens a task, as the
  official one does, so the steps take the task as a static argument (``static_task``):
  one train and one eval program per task. (A fixed layout of all ``T`` prompts, the later
  ones masked out, would compile once but carry every task's prompt from task 0: 2.6 times
  the tokens of task 0 with ten prompts of 10 on 48-token texts.)
* Evaluation: pass ``j`` (prompts ``0..j``, head ``j``) never changes once task ``j`` is
  learnt (``task_features_fixed``), so the loop computes its output on each test set once,
  as the official evaluation of task ``j`` does, and later evaluations read it: over ``T``
  tasks ``T^2`` passes over a test set's size instead of the sum of ``(t + 1)^2`` (only the
  passes whose heads score a class: in domain-incremental learning, the latest task's, one
  per test set and evaluation as before). Where nothing is cached (``feature_cache``
  disabled or too small, the training split, the reference row before task 0) an
  evaluation after task ``t`` runs its passes ``j <= t`` over prompts ``0..t``, those
  after ``j`` masked out (``prompt_mask``), so that one pass body serves them all.
* The loop reports class-incremental accuracy too (argmax over every seen task's head
  columns, each from its own pass): the heads are not calibrated against each other, so
  read the task-IL matrix for the paper's protocol. No early stopping on a validation split
  (the official code keeps the best epoch of the current task).

The official optimiser (``transformers.AdamW``, lr 3e-5, weight decay 0.01, 1000 warm-up
steps, one for the whole run: batch 8, 50 epochs on BERT-base) is the config's, not the
method's; the method names its prompts as the group whose Adam step count runs over the
run under ``train.optimizer_scope='run'`` (:meth:`ProgressivePrompts.run_long_groups`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pecft_jax.backbones import bert
from pecft_jax.backbones.context import LayerPEFT, PEFTContext
from pecft_jax.methods.base import (Method, TaskSpec, init_linear_head,
                                    mask_task_columns, mask_task_slice)
from pecft_jax.methods.common import cached_task_features

Array = jax.Array


def prompt_positions(text_length: int, num_tasks: int, length: int) -> np.ndarray:
    """``(T, L)`` position ids of every task's prompt tokens (CLU:313-324): 0 for each
    prompt's first token, then ``text_length + 1``, ``+ 2`` ... running on across prompts
    (``text_length`` = the text's tokens without [CLS], the official ``seq_len``)."""
    positions = np.zeros((num_tasks, length), np.int32)
    start = text_length + 1
    for k in range(num_tasks):
        positions[k, 1:] = np.arange(start, start + length - 1)
        start += length - 1
    return positions


def _dropout(x: Array, rate: float, rng: Array) -> Array:
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


class ProgressivePrompts(Method):
    name = "progressive_prompts"
    scores_unlearnt_classes = False  # a class no learnt task teaches gets logit 0
    train_class_mask = "task"
    static_task = True  # the sequence holds prompts 0..t: its length is the task's
    task_features_fixed = True  # pass j (prompts 0..j, head j) is frozen once task j ends

    @dataclasses.dataclass(frozen=True)
    class Config:
        prompt_length: int = 10     # --prefix_len (train_cl2.py:150-155; the scripts' 10)
        residual_mlp: bool = True   # the paper's reparameterisation (--prefix_MLP residual_MLP1)
        mlp_bottleneck: int = 800   # --bottleneck_size (train_cl2.py:164-169)
        head_dropout: float = 0.1   # adapter-transformers ClassificationHead's dropout

        def __post_init__(self):
            if self.prompt_length < 1 or self.mlp_bottleneck < 1:
                raise ValueError(f"progressive_prompts prompt_length and mlp_bottleneck must "
                                 f"be >= 1, got {self.prompt_length}, {self.mlp_bottleneck}")
            if not 0.0 <= self.head_dropout < 1.0:
                raise ValueError(f"progressive_prompts head_dropout must be in [0, 1), got "
                                 f"{self.head_dropout}")

    def __init__(self, config, backbone, num_classes, num_tasks):
        super().__init__(config, backbone, num_classes, num_tasks)
        if getattr(backbone, "modality", None) != "text":
            raise ValueError("progressive_prompts is the text method of Razdaibiedina et al. "
                             "(prompts through BERT's embedding layer, read at their first "
                             "token): give a text backbone (backbone.checkpoint='minilm' or a "
                             "BERT folder) and a text dataset")
        cfg, length = backbone.config, self.config.prompt_length
        self.positions = prompt_positions(backbone.max_length - 1, num_tasks, length)
        if self.positions.max() >= cfg.max_position_embeddings:
            raise ValueError(f"{num_tasks} prompts of {length} tokens after {backbone.max_length} "
                             f"text tokens need position ids up to {self.positions.max()}, but "
                             f"{cfg.name} has {cfg.max_position_embeddings}; shorten "
                             f"backbone.max_length or method.prompt_length")
        self.cls_id = backbone.tokenizer.tokenizer.token_to_id("[CLS]")
        if self.cls_id is None:
            raise ValueError(f"the tokenizer {backbone.tokenizer_path} has no [CLS] token, whose "
                             f"embedding starts every prompt")

    # ------------------------------------------------------------------ set-up
    def init(self, rng, frozen):
        c, dim, tasks = self.config, self.backbone.feature_dim, self.num_tasks
        words = frozen["embeddings"]["word_embeddings"]["embedding"]
        k_ids, k_down, k_up, k_head = jax.random.split(rng, 4)
        ids = jax.random.randint(k_ids, (tasks, c.prompt_length), 0, words.shape[0])
        ids = ids.at[:, 0].set(self.cls_id)  # [PRE_t_1] <- [CLS] (MU:197-208)
        prompts = jnp.asarray(words, jnp.float32)[ids]

        def per_task(key, in_dim, out_dim):  # torch nn.Linear's default init, one per task
            layers = [init_linear_head(k, in_dim, out_dim) for k in jax.random.split(key, tasks)]
            return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *layers)

        std = 0.02  # BERT's _init_weights, which the adapter-transformers heads use
        k_hidden, k_out = jax.random.split(k_head)
        head = {"hidden": {"kernel": std * jax.random.normal(k_hidden, (tasks, dim, dim)),
                           "bias": jnp.zeros((tasks, dim))},
                "out": {"kernel": std * jax.random.normal(k_out, (dim, self.num_classes)),
                        "bias": jnp.zeros((self.num_classes,))}}
        trainable = {"prompts": prompts, "head": head}
        if c.residual_mlp:
            trainable["mlp"] = {"down": per_task(k_down, dim, c.mlp_bottleneck),
                                "up": per_task(k_up, c.mlp_bottleneck, dim)}
        # what the encoder receives for every finished task's prompt
        state = {"prompt_tokens": jnp.zeros((tasks, c.prompt_length, dim), jnp.float32)}
        return trainable, state

    def param_labels(self, trainable, task):
        """The prompts, and the heads and MLPs: two groups, for the optimizer's step counts
        (:meth:`run_long_groups`); one learning rate (MU:172-176)."""
        return {name: jax.tree_util.tree_map(lambda _: "prompt" if name == "prompts"
                                             else "train", tree)
                for name, tree in trainable.items()}

    def optimizer_groups(self, task, base):
        return {"prompt": base, "train": base}

    def run_long_groups(self, task):
        """The official prompts are rows of BERT's one word-embedding tensor, which every
        task trains a slice of (MU:185-212, 411-426) under one AdamW for the run: a new
        prompt starts at the run's Adam step count, with zero moments. Heads and MLPs are
        tensors of their own, whose counts start with their task."""
        return ("prompt",)

    def update_mask(self, trainable, task):
        """Task ``t``'s prompt, MLP and head learn; the others stay exactly as they are."""
        t, tasks = task.index, self.num_tasks
        mask = {"prompts": mask_task_slice(trainable["prompts"], t, tasks),
                "head": {"hidden": mask_task_slice(trainable["head"]["hidden"], t, tasks),
                         "out": mask_task_columns(trainable["head"]["out"], task)}}
        if "mlp" in trainable:
            mask["mlp"] = mask_task_slice(trainable["mlp"], t, tasks)
        return mask

    def after_task(self, task, trainable, state, frozen, data, rng):
        """Keep ``P_t`` as the encoder receives it (through ``MLP_t``, no dropout)."""
        tokens = self._current_prompt(trainable, frozen, task.index)
        stored = jnp.asarray(state["prompt_tokens"]).at[task.index].set(tokens)
        return trainable, dict(state, prompt_tokens=stored)

    # ------------------------------------------------------------------ traced
    def _embedded(self, trainable, frozen, t) -> Array:
        """``P_t`` through BERT's embedding layer, ``(L, D)`` (dropout is applied later)."""
        return bert.embed_vectors(self.backbone.config, frozen, trainable["prompts"][t],
                                  jnp.asarray(self.positions)[t])

    def _reparameterise(self, trainable, t, x: Array) -> Array:
        """``x + MLP_t(x)`` (or ``x`` without the MLP)."""
        if "mlp" not in trainable:
            return x
        down = jax.tree_util.tree_map(lambda a: a[t], trainable["mlp"]["down"])
        up = jax.tree_util.tree_map(lambda a: a[t], trainable["mlp"]["up"])
        hidden = jax.nn.relu(x @ down["kernel"] + down["bias"])
        return x + hidden @ up["kernel"] + up["bias"]

    def _current_prompt(self, trainable, frozen, t) -> Array:
        return self._reparameterise(trainable, t, self._embedded(trainable, frozen, t))

    def _head(self, head, h: Array, j, dropout_rngs=None) -> Array:
        """Task ``j``'s head on ``h`` ``(B, D)``, as logits over all classes (the columns of
        task ``j``'s classes are its output layer)."""
        rate = self.config.head_dropout
        if dropout_rngs is not None and rate:
            h = _dropout(h, rate, dropout_rngs[0])
        h = jnp.tanh(h @ head["hidden"]["kernel"][j] + head["hidden"]["bias"][j])
        if dropout_rngs is not None and rate:
            h = _dropout(h, rate, dropout_rngs[1])
        return h @ head["out"]["kernel"] + head["out"]["bias"]

    def _encode(self, frozen, inputs, tokens: Array, j, rng=None) -> Array:
        """The output at prompt ``j``'s first token with prompts ``0..j`` active.
        ``tokens``: ``(B, k, L, D)`` prompts ``0..k-1`` as the encoder receives them, ``j <
        k`` (may be traced); prompts after ``j`` are masked out of the attention."""
        batch, count, length, dim = tokens.shape
        active = None
        if not (isinstance(j, int) and j == count - 1):
            active = jnp.repeat(jnp.arange(count) <= j, length)
        context = PEFTContext({0: LayerPEFT(prompt=tokens.reshape(batch, count * length, dim),
                                            prompt_mask=active)})
        # the official input has no [CLS]: mask the text's out of the attention
        inputs = dict(inputs, attention_mask=inputs["attention_mask"].at[:, 0].set(0))
        out = self.backbone.apply(frozen, inputs, context, output="tokens",
                                  deterministic=rng is None, dropout_rng=rng)
        return jnp.take(out, 1 + j * length, axis=1)

    def loss(self, trainable, state, frozen, batch, rng, task: TaskSpec):
        t, inputs = int(task.index), batch["inputs"]
        batch_size = inputs["token_ids"].shape[0]
        k_embed, k_encoder, k_head1, k_head2 = jax.random.split(rng, 4)
        # the finished tasks' prompts as kept, then P_t: the official [P_0; ...; P_t]
        tokens = jnp.concatenate([state["prompt_tokens"][:t],
                                  self._embedded(trainable, frozen, t)[None]])
        tokens = jnp.broadcast_to(tokens, (batch_size,) + tokens.shape)
        rate = self.backbone.config.hidden_dropout
        if rate:  # the embedding layer's dropout, on every input token (MU:386-394)
            tokens = _dropout(tokens, rate, k_embed)
        # MLP_t after the embedding layer, on P_t's slice
        tokens = tokens.at[:, t].set(self._reparameterise(trainable, t, tokens[:, t]))
        h = self._encode(frozen, inputs, tokens, t, k_encoder)
        logits = self._head(trainable["head"], h, t, (k_head1, k_head2))
        ce = self.masked_ce(logits, batch, task)
        return ce, {"metrics": {"accuracy": self.train_accuracy(logits, batch, task)}}

    def task_features(self, trainable, state, frozen, inputs, task):
        """Task ``j``'s pass, as the official evaluation runs it (prompts ``0..j``, nothing
        masked): the output at ``P_j``'s first token, ``(B, D)``. Fixed once ``P_j`` is kept:
        the loop computes it once per test set (``task_features_fixed``)."""
        j = int(task.index)
        return self._encode(frozen, inputs, self._kept_prompts(state, j + 1, inputs), j)

    def _kept_prompts(self, state, count: int, inputs) -> Array:
        """The kept prompts ``0..count-1`` for every text of the batch, ``(B, count, L, D)``."""
        prompts = state["prompt_tokens"][:count]
        return jnp.broadcast_to(prompts, (inputs["token_ids"].shape[0],) + prompts.shape)

    def _owners(self, task) -> tuple:
        """``(owner, passes)``: the latest learnt task teaching each class (-1: none), and
        the tasks whose heads score some class, after task ``task.index``."""
        owner = np.full(self.num_classes, -1)
        for k, classes in enumerate(task.task_classes[:int(task.index) + 1]):
            owner[list(classes)] = k
        return owner, np.unique(owner[owner >= 0])

    def scored_passes(self, task):
        """Only the passes whose heads score a class: in domain-incremental learning (every
        task teaches the same classes) the latest task's alone."""
        return tuple(int(j) for j in self._owners(task)[1])

    def logits(self, trainable, state, frozen, batch, task):
        """Every learnt task ``j``'s classes scored by head ``j`` with prompts ``0..j``. A
        class several tasks share (domain-incremental: no task identity at test time) is
        scored by the latest learnt of them, ``k``, with prompts ``0..k``. The passes'
        outputs come from the batch when the loop cached them (``batch['task_features']``)."""
        t = int(task.index)
        owner, passes = self._owners(task)

        def run_passes():  # (B, T, D): the scoring passes j over prompts 0..t, masked after j
            inputs = batch["inputs"]
            tokens = self._kept_prompts(state, t + 1, inputs)
            out = jax.lax.map(lambda j: self._encode(frozen, inputs, tokens, j),
                              jnp.asarray(passes))                        # (P, B, D)
            full = jnp.zeros((self.num_tasks,) + out.shape[1:], out.dtype).at[passes].set(out)
            return jnp.swapaxes(full, 0, 1)

        h = cached_task_features(batch, run_passes)[:, passes]            # (B, P, D)
        per_pass = jax.vmap(lambda j, hj: self._head(trainable["head"], hj, j))(
            jnp.asarray(passes), jnp.swapaxes(h, 0, 1))                   # (P, B, C)
        mine = jnp.asarray(owner[None, :] == passes[:, None])[:, None, :]
        return jnp.sum(jnp.where(mine, per_pass, 0.0), axis=0)
