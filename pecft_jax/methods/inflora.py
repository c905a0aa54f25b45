"""InfLoRA: Interference-Free Low-Rank Adaptation (Liang & Li, CVPR 2024; official code
liangyanshuo/InfLoRA, ``methods/inflora.py``, ``models/vit_inflora.py``).

Every task ``t`` adds a LoRA branch ``x A_t B_t`` to the key and value projections of every
block (rank 10, no ``alpha / r`` factor; the code's names: ``A`` the down-projection, ``B``
the up-projection -- the paper swaps the letters). Per task:

* **Design ``A_t``** before training, from the current task's layer inputs ``x`` (the
  LayerNorm output the query/key/value projections read, every token; one pass over the
  task's training images through the training augmentation, as the official code reads its
  ``train_loader``) under the model as it is (earlier branches active): ``C = sum x x^T``;
  with ``M`` the stored basis of the old tasks' input subspace, the top-``r`` left singular
  vectors of ``C - M M^T C`` (of ``C`` on task 0; of ``M M^T C`` when ``M`` stores the
  complement, below), divided by ``sqrt 3``.
  ``A_t`` is then frozen and shared by key and value: every update ``A_t dB`` lies in a
  subspace orthogonal to the old tasks' inputs, so it does not interfere with them.
* **Train** only ``B_t`` (zero-initialised: the task starts at the previous model) and
  task ``t``'s linear head, cross-entropy over the task's classes (Adam, lr 5e-4).
* **DualGPM** after training, on the inputs under the trained model (another augmented
  pass, fresh draws, as the official second loop over ``train_loader``): the basis grows by
  the directions needed for the energy threshold ``lamb + (lame - lamb) t / T`` -- the
  energy of the code is the *squared* singular values of ``C`` -- and once it passes half
  the width it is replaced by its orthogonal complement ("retain": what is still free
  shrinks instead), exactly as the official ``update_DualGPM``. (Its first-task 'retain'
  branch stores the wrong basis and then fails an assertion; here it stores the
  complement.)

Prediction: every task's branch active (their sum, as merging them into the weights would
give), the heads of all seen tasks, argmax.

Fixed shapes: all tasks' branches are in the trainable tree from the start, stacked on a
task axis (``peft.lora.init_task_loras``); ``B`` of tasks not trained yet is zero, so the
sum over all equals the sum over the trained ones; ``update_mask`` trains slice ``t``. The
basis is kept zero-padded to ``(D, D)`` per block with its width and kind.

Cost: the official forward forms ``sum_{s<=t} B_s A_s`` as one ``D x D`` weight beside the
frozen one. Here, where the matmuls are float32 (``peft.lora.folds_exactly``: float32
compute on a CPU, or float32 matmul precision), the branches that do not learn are folded
into the frozen kernels -- every task's for evaluation and the input passes, the others
than ``t``'s (as constants) while task ``t`` trains, whose own rank-``r`` branch stays
beside them (``peft.lora.fold_task_loras``): the same function up to float rounding, at a
per-token cost that does not grow with the tasks. Elsewhere (bf16 compute, a GPU's TF32)
the branches stay unfolded (the ``T r``-wide sum of ``peft.lora.task_lora_context``): a
kernel rounded to fewer bits would round the small folded update away.

``moments_on_augmented=False`` takes both passes on the un-augmented images instead (in a
run without augmentation the two are the same).
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pecft_jax.methods.base import (FROZEN, Method, TaskSpec, apply_linear_head, count_params,
                                    init_linear_head, mask_task_columns, mask_task_slice)
from pecft_jax.peft.lora import (LoraConfig, fold_task_loras, folds_exactly, init_task_loras,
                                 task_lora_context, task_slice)

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- DualGPM
def design_down_projection(moments: np.ndarray, basis: np.ndarray, retain: bool,
                           rank: int) -> np.ndarray:
    """``A_t`` ``(D, r)`` of one block: the top-``rank`` left singular vectors of the task's
    input moments ``C`` with the protected subspace projected out (``C - M M^T C``; ``M M^T
    C`` when ``basis`` holds the complement, ``retain``; ``C`` itself with an empty basis),
    divided by ``sqrt(3)`` (official ``inflora.py``)."""
    c = np.asarray(moments, np.float64)
    if retain and not basis.shape[1]:  # nothing left outside the protected subspace
        return np.zeros((c.shape[0], rank))
    if basis.shape[1]:
        projection = basis @ basis.T
        c = projection @ c if retain else c - projection @ c
    u = np.linalg.svd(c, full_matrices=False)[0]
    return u[:, :rank] / np.sqrt(3.0)


def update_dual_gpm(moments: np.ndarray, basis: np.ndarray, retain: bool, threshold: float
                    ) -> Tuple[np.ndarray, bool]:
    """The official ``update_DualGPM`` for one block after a task: returns the new basis
    ``(D, k)`` and whether it holds the complement of the protected subspace.

    Energy is ``S**2`` of the singular values ``S`` of the moments ``C`` (what the official
    code sums). Empty basis: keep the top ``r`` directions, ``r`` = how many cumulative
    energy ratios stay below ``threshold``. 'remove' basis: add the leading directions of
    ``C - M M^T C`` until the protected energy reaches ``threshold``. 'retain' basis (the
    complement): remove from it the leading directions of ``M M^T C`` while the energy left
    outside the protected subspace is at least ``1 - threshold``. A 'remove' basis wider
    than ``D / 2`` becomes its complement."""
    c = np.asarray(moments, np.float64)
    dim = c.shape[0]
    if not basis.shape[1] and not retain:  # the first task
        u, s, _ = np.linalg.svd(c)
        ratio = s ** 2 / np.sum(s ** 2)
        r = int(np.sum(np.cumsum(ratio) < threshold))
        if r < dim / 2:
            return u[:, :max(r, 1)], False
        return u[:, max(r, 1):], True  # the complement (the official code keeps u[:, :r])
    total = np.sum(np.linalg.svd(c, compute_uv=False) ** 2)
    projection = basis @ basis.T
    if not retain:
        u, s, _ = np.linalg.svd(c - projection @ c, full_matrices=False)
        acc, r = (total - np.sum(s ** 2)) / total, 0
        while r < len(s) and acc < threshold:
            acc += s[r] ** 2 / total
            r += 1
        if r:
            basis = np.concatenate([basis, u[:, :r]], axis=1)[:, :dim]
    else:
        u, s, _ = np.linalg.svd(projection @ c, full_matrices=False)
        acc, r = np.sum(s ** 2) / total, 0
        while r < len(s) and acc >= 1.0 - threshold:
            acc -= s[r] ** 2 / total
            r += 1
        if r:
            left = basis - u[:, :r] @ (u[:, :r].T @ basis)
            basis = np.linalg.svd(left)[0][:, :basis.shape[1] - r]
    if not retain and basis.shape[1] > dim / 2:
        basis, retain = np.linalg.svd(basis)[0][:, basis.shape[1]:], True
    return basis, retain


def gpm_threshold(lamb: float, lame: float, task: int, num_tasks: int) -> float:
    """The official energy threshold after task ``task`` (0-based): ``lamb + (lame - lamb)
    task / T``."""
    return lamb + (lame - lamb) * task / num_tasks


# ----------------------------------------------------------------------------- method
class InfLoRA(Method):
    name = "inflora"
    train_class_mask = "task"  # the official loss: the current task's head only

    @dataclasses.dataclass(frozen=True)
    class Config:
        rank: int = 10          # official json "rank" (CIFAR-100, ImageNet-R; DomainNet 30)
        lamb: float = 0.95      # official json "lamb" (ImageNet-R 0.98)
        lame: float = 1.0       # official json "lame"
        # the input passes read the augmented training images (official: train_loader, built
        # with the training transform, in _train before and after the epochs)
        moments_on_augmented: bool = True

        def __post_init__(self):
            if not isinstance(self.rank, int) or self.rank <= 0:
                raise ValueError(f"inflora rank must be a positive int, got {self.rank!r}")
            if not 0.0 < self.lamb <= self.lame <= 1.0:
                raise ValueError(f"inflora needs 0 < lamb <= lame <= 1, got {self.lamb} and "
                                 f"{self.lame}")

    def __init__(self, config, backbone, num_classes, num_tasks):
        super().__init__(config, backbone, num_classes, num_tasks)
        r = self.config.rank
        # k and v of every block, no alpha/r factor (scaling 1)
        self.lora_cfg = LoraConfig(r=r, lora_alpha=r, target_modules=("key", "value"))
        if r > backbone.feature_dim:
            raise ValueError(f"inflora rank {r} exceeds the width {backbone.feature_dim}")

    # ------------------------------------------------------------------ set-up
    def init(self, rng, frozen):
        k_lora, k_head = jax.random.split(rng)
        dim, layers = self.backbone.feature_dim, self.backbone.config.num_layers
        trainable = {"lora": init_task_loras(self.backbone.config, self.lora_cfg,
                                             self.num_tasks, k_lora),
                     "head": init_linear_head(k_head, dim, self.num_classes)}
        state = {"basis": jnp.zeros((layers, dim, dim), jnp.float32),
                 "basis_width": jnp.zeros((layers,), jnp.int32),
                 "retain": jnp.zeros((layers,), jnp.int32)}
        return trainable, state

    def param_labels(self, trainable, task):
        """The designed down-projections ``A`` never enter ``jax.grad``."""
        lora = {layer: {target: {"A": FROZEN, "B": "train"} for target in targets}
                for layer, targets in trainable["lora"].items()}
        return {"lora": lora, "head": jax.tree_util.tree_map(lambda _: "train",
                                                            trainable["head"])}

    def update_mask(self, trainable, task):
        """Task ``t``'s ``B`` (slice ``t``) and head columns learn, nothing else."""
        return {"lora": mask_task_slice(trainable["lora"], task.index, self.num_tasks),
                "head": mask_task_columns(trainable["head"], task)}

    def step_state(self, state):
        return {}  # the steps read no basis

    # ------------------------------------------------------------------ traced
    def features(self, trainable, frozen, images, output="cls", training=None):
        """The backbone with every task's branch; ``training``: the index of the task whose
        ``B`` learns (its branch is then kept apart from the folded others)."""
        lora = trainable["lora"]
        if not folds_exactly(self.backbone.config.dtype):  # a folded update would be rounded
            return self.backbone.apply(frozen, images, task_lora_context(lora, self.lora_cfg),
                                       output=output)
        if training is None:
            return self.backbone.apply(fold_task_loras(frozen, lora, self.lora_cfg), images,
                                       output=output)
        others = (jnp.arange(self.num_tasks) != training).astype(jnp.float32)
        params = fold_task_loras(frozen, jax.lax.stop_gradient(lora), self.lora_cfg, others)
        return self.backbone.apply(params, images,
                                   task_lora_context(task_slice(lora, training),
                                                     self.lora_cfg), output=output)

    def loss(self, trainable, state, frozen, batch, rng, task: TaskSpec):
        logits = apply_linear_head(trainable["head"], self.features(
            trainable, frozen, batch["inputs"], training=task.index))
        ce = self.masked_ce(logits, batch, task)
        return ce, {"metrics": {"accuracy": self.train_accuracy(logits, batch, task)}}

    def logits(self, trainable, state, frozen, batch, task):
        return apply_linear_head(trainable["head"],
                                 self.features(trainable, frozen, batch["inputs"]))

    # ------------------------------------------------------------ around tasks
    def input_moments(self, carry, batch, trainable, frozen):
        """Adds ``sum x x^T`` over the batch's tokens of every block's query/key/value input
        to ``carry`` ``(L, D, D)`` (a TaskData reduction). Padding rows of the batch weigh 0,
        and so do a text encoder's padding tokens (its attention mask): no token attends to
        them and the pooled sentence ignores them, so they are not inputs the task's
        subspace should hold -- on WordNet's 48-token rows they would be most of the rows.
        (The official code is image-only: every ViT token counts.)"""
        features = self.features(trainable, frozen, batch["inputs"], output="features")
        x = jnp.stack([b["attn_input"] for b in features["blocks"]])       # (L, B, N, D)
        weight = batch["mask"][:, None]                                     # (B, 1)
        if "attention_mask" in features:  # text: (B, N), 1 for a real token
            weight = weight * features["attention_mask"].astype(x.dtype)
        weighted = x * weight[None, :, :, None]
        return carry + jnp.einsum("lbnd,lbne->lde", weighted, x, precision=HIGHEST)

    def _moments(self, trainable, frozen, data) -> np.ndarray:
        layers, dim = self.backbone.config.num_layers, self.backbone.feature_dim
        return np.asarray(jax.device_get(data.reduce(
            self.input_moments, jnp.zeros((layers, dim, dim), jnp.float32), trainable, frozen,
            additive=True)))

    def _pass(self, data, epoch: int):
        """The images of an input pass: a fresh augmentation per pass (``epoch`` 0 before
        the task's steps, 1 after), or the plain ones."""
        return data.augmented(epoch) if self.config.moments_on_augmented else data

    @staticmethod
    def _bases(state):
        basis, width, retain = (np.asarray(jax.device_get(state[k]))
                                for k in ("basis", "basis_width", "retain"))
        return [(basis[l, :, :width[l]], bool(retain[l])) for l in range(len(width))]

    def before_task(self, task, trainable, state, frozen, data, rng):
        """Designs task ``t``'s down-projections from its inputs under the current model."""
        moments = self._moments(trainable, frozen, self._pass(data, epoch=0))
        lora = jax.tree_util.tree_map(np.array, jax.device_get(trainable["lora"]))
        for l, (basis, retain) in enumerate(self._bases(state)):
            down = design_down_projection(moments[l], basis, retain, self.config.rank)
            for target in lora[str(l)]:  # key and value share it (official)
                lora[str(l)][target]["A"][task.index] = down
        return dict(trainable, lora=jax.device_put(lora)), state

    def after_task(self, task, trainable, state, frozen, data, rng):
        """Grows (or, as a complement, shrinks) every block's protected input subspace with
        the inputs of the task under the trained model."""
        moments = self._moments(trainable, frozen, self._pass(data, epoch=1))
        threshold = gpm_threshold(self.config.lamb, self.config.lame, task.index,
                                  self.num_tasks)
        layers, dim = moments.shape[0], moments.shape[1]
        padded = np.zeros((layers, dim, dim), np.float32)
        width, retain_flags = np.zeros(layers, np.int32), np.zeros(layers, np.int32)
        for l, (basis, retain) in enumerate(self._bases(state)):
            basis, retain = update_dual_gpm(moments[l], basis, retain, threshold)
            padded[l, :, :basis.shape[1]] = basis
            width[l], retain_flags[l] = basis.shape[1], int(retain)
        return trainable, jax.device_put({"basis": padded, "basis_width": width,
                                          "retain": retain_flags})

    def count_trainable(self, trainable, state):
        """The trained up-projections ``B`` of every task and the heads, over the run (the
        designed ``A`` are not learnt; the official log counts one task's: ``B`` and its
        head)."""
        trained = [f["B"] for targets in trainable["lora"].values() for f in targets.values()]
        return count_params(trained) + count_params(trainable["head"])
