"""What a continual method is, as the one training loop sees it.

A method declares its hyper-parameters (a frozen ``Config`` dataclass with the paper's
defaults), its trainable pytree and its state, its loss, its hooks around tasks and how it
predicts. It owns no training loop, data loader or checkpoint format. For task ``t`` the
loop calls, in this order::

    trainable, state = method.before_task(task, trainable, state, frozen, data, rng)
    epochs = method.train_epochs(task, config.train.epochs)   # 0: no optimizer, no compile
    repeat steps_per_epoch * epochs times (jit-compiled, data-parallel, buffers donated):
        trainable, state, opt_state, metrics = method.update(trainable, state, opt_state,
                                                             frozen, batch, rng, task, optimizer)
    trainable, state = method.after_task(task, trainable, state, frozen, data, rng)
    evaluation on tasks 0..t with method.logits(trainable, state, frozen, batch, task)

Conventions the loop relies on:

* ``trainable`` and ``state`` are nested dicts with string keys and array leaves (they are
  checkpointed as such). ``frozen`` is the backbone's parameter tree; it is an argument of
  every traced function but never differentiated.
* ``loss``, ``update`` and ``logits`` are traced inside ``jax.jit``; there ``task`` is a
  :class:`TaskSpec` whose index is traced (one compilation for every task), unless the
  method sets ``static_task = True``.
* ``before_task`` / ``after_task`` run in Python between tasks (they may change shapes);
  ``data`` (:class:`TaskData`) gives them device-side passes over the task's training data.
* Labels in batches are remapped to the class order: task ``t`` owns ``task.classes``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pecft_jax import compiler
from pecft_jax.backbones.backbone import Backbone
from pecft_jax.peft.prompt_pool import batch_mean

Array = jax.Array
NEG_INF = -1e9  # finite, so masked logits keep softmax/CE free of NaNs
FROZEN = "frozen"  # the optimizer label of leaves that never enter jax.grad


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """The task being trained: its index among the scenario's tasks and every task's classes.

    Outside traced code (``before_task``, ``after_task``, ``param_labels``...) ``index`` is a
    Python int and everything is concrete. Inside ``loss`` / ``update`` / ``logits`` the loop
    passes ``index`` as a traced int32 scalar (a pytree leaf; the classes are static aux
    data), so one compiled step serves every task: there ``class_mask`` is a traced mask and
    ``classes`` / ``seen_classes`` -- whose length changes with the task -- are unavailable.
    A method that needs them (or shapes that depend on the task) while traced sets
    ``Method.static_task = True`` and gets a concrete spec, at one compilation per task.
    """
    index: Any                                 # int, or an int32 tracer inside traced code
    num_classes: int                           # all classes of the scenario
    task_classes: Tuple[Tuple[int, ...], ...]  # the (remapped) classes of every task, by index

    def tree_flatten(self):
        return (self.index,), (self.num_classes, self.task_classes)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    @property
    def num_tasks(self) -> int:
        return len(self.task_classes)

    @property
    def is_traced(self) -> bool:
        return not isinstance(self.index, (int, np.integer))

    def _concrete_index(self, what: str) -> int:
        if self.is_traced:
            raise TypeError(
                f"TaskSpec.{what} needs a concrete task index, but this spec's index is traced "
                f"(one compiled step serves every task); use task.class_mask(...) instead, or "
                f"set static_task = True on the method (one compilation per task)")
        return int(self.index)

    @property
    def classes(self) -> Tuple[int, ...]:
        """This task's classes (concrete index only)."""
        return self.task_classes[self._concrete_index("classes")]

    @property
    def seen_classes(self) -> Tuple[int, ...]:
        """The classes of tasks 0..index, in task order (concrete index only)."""
        t = self._concrete_index("seen_classes")
        return tuple(c for classes in self.task_classes[:t + 1] for c in classes)

    def class_mask(self, which: str) -> Any:
        """Boolean (num_classes,) mask: 'task' (this task's classes), 'seen' (tasks
        0..index) or 'all'. numpy for a concrete index, a traced array for a traced one."""
        if which not in ("task", "seen", "all"):
            raise ValueError(f"unknown class mask {which!r}; use 'task', 'seen' or 'all'")
        if which == "all":
            return np.ones(self.num_classes, bool)
        # membership[t, c]: task t teaches class c (a class may recur: domain-incremental)
        membership = np.zeros((self.num_tasks, self.num_classes), bool)
        for t, classes in enumerate(self.task_classes):
            membership[t, list(classes)] = True
        table = membership if which == "task" else np.logical_or.accumulate(membership, axis=0)
        if self.is_traced:
            return jnp.asarray(table)[self.index]
        return table[int(self.index)]

    def task_of_class(self) -> np.ndarray:
        """``(num_classes,)`` int32: the task that teaches each class."""
        owner = np.zeros(self.num_classes, np.int32)
        for t, classes in enumerate(self.task_classes):
            owner[list(classes)] = t
        return owner


# ----------------------------------------------------------------------------- configs
def parse_config(config_cls: type, values: Any, what: str) -> Any:
    """``values`` (a mapping such as ``config.method``, or already a ``config_cls``) as a
    frozen ``config_cls`` instance.

    An unknown key is an error naming it and the valid ones (a misspelt key in a config file
    must not pass silently). Lists become tuples; a field whose default is itself a config
    dataclass (e.g. ``lora: LoraConfig``) takes a mapping of that dataclass's fields, the
    rest keeping the default's values. ``name`` is the registry key, not a field.
    """
    if isinstance(values, config_cls):
        return values
    values = dict(_as_dict(values))
    values.pop("name", None)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {unknown} for {config_cls.__qualname__}; "
                         f"valid keys: {sorted(fields)} (check the spelling in the config file "
                         f"or the --config override)")
    kwargs = {}
    for key, value in values.items():
        default = _field_default(fields[key])
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            value = parse_config(type(default), {**dataclasses.asdict(default), **_as_dict(value)},
                                 f"{what}.{key}")
        kwargs[key] = _as_tuples(value)
    return config_cls(**kwargs)


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _as_dict(values: Any) -> dict:
    return values.to_dict() if hasattr(values, "to_dict") else dict(values)


def _as_tuples(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


def config_field(default_factory: Callable[[], Any]) -> Any:
    """A dataclass field holding a nested config (a dataclass instance) by default."""
    return dataclasses.field(default_factory=default_factory)


# ----------------------------------------------------------------------------- pieces
def mask_logits(logits: Array, mask: np.ndarray) -> Array:
    return jnp.where(jnp.asarray(mask)[None, :], logits, NEG_INF)


def cross_entropy(logits: Array, labels: Array, weights: Optional[Array] = None) -> Array:
    """Mean cross-entropy over the batch, over its examples alone given ``weights`` (the
    batch's ``mask``, :func:`~pecft_jax.peft.prompt_pool.batch_mean`)."""
    return batch_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), weights)


def batch_accuracy(logits: Array, labels: Array, weights: Optional[Array] = None) -> Array:
    return batch_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), weights)


HEAD_INITS = ("torch_linear", "zeros", "trunc_normal")


def init_linear_head(rng: Array, in_dim: int, num_classes: int, init: str = "torch_linear"
                     ) -> dict:
    """A linear classifier over all classes of the scenario (trained with masking).

    ``init``: ``'torch_linear'`` -- PyTorch ``nn.Linear``'s default, kernel and bias
    ``U(-1/sqrt(in_dim), 1/sqrt(in_dim))`` (the PyTorch ports); ``'zeros'`` -- kernel and bias
    0 (the official L2P / DualPrompt JAX head, ``nn.Dense(kernel_init=zeros)``);
    ``'trunc_normal'`` -- timm's ``trunc_normal_(std=.02)`` (cut at +-2, i.e. +-100 sd) and
    bias 0 (timm's ViT head, which HiDe-Prompt's code keeps)."""
    if init not in HEAD_INITS:
        raise ValueError(f"unknown head init {init!r}; known: {', '.join(HEAD_INITS)}")
    if init == "zeros":
        return {"kernel": jnp.zeros((in_dim, num_classes), jnp.float32),
                "bias": jnp.zeros((num_classes,), jnp.float32)}
    if init == "trunc_normal":
        std = 0.02
        kernel = std * jax.random.truncated_normal(rng, -2.0 / std, 2.0 / std,
                                                   (in_dim, num_classes), jnp.float32)
        return {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}
    bound = 1.0 / np.sqrt(in_dim)
    k_w, k_b = jax.random.split(rng)
    return {"kernel": jax.random.uniform(k_w, (in_dim, num_classes), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(k_b, (num_classes,), jnp.float32, -bound, bound)}


def apply_linear_head(head: Mapping[str, Array], features: Array) -> Array:
    return features @ head["kernel"] + head["bias"]


def mask_task_slice(stacked: Any, task_index: Any, num_tasks: int) -> Any:
    """The :meth:`Method.update_mask` of a tree whose leaves are stacked on a leading task
    axis (one adapter / LoRA per task): 1 on slice ``task_index`` (may be traced), 0 on the
    others, broadcast over each leaf's trailing axes."""
    current = (jnp.arange(num_tasks) == task_index).astype(jnp.float32)
    return jax.tree_util.tree_map(
        lambda leaf: current.reshape((-1,) + (1,) * (jnp.ndim(leaf) - 1)), stacked)


def mask_task_columns(head: Mapping[str, Any], task: "TaskSpec") -> dict:
    """The :meth:`Method.update_mask` of a linear head over all classes that is one head per
    task (the leaves end in the class axis): 1 on the current task's classes."""
    columns = jnp.asarray(task.class_mask("task"), jnp.float32)
    return {name: columns for name in head}


def keep_class_columns(new: Any, old: Any, classes: np.ndarray) -> Any:
    """``new`` on the classes of the boolean ``classes`` mask, ``old`` on the others, for a
    classifier whose leaves end in a class axis (a ``(D, C)`` kernel, a ``(C,)`` bias):
    what an optimizer step over the whole array may not change -- the heads of classes
    that do not exist yet in the official code, which weight decay would otherwise shrink."""
    keep = jnp.asarray(classes, bool)
    return jax.tree_util.tree_map(lambda n, o: jnp.where(keep, n, o), new, old)


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays (or ``ShapeDtypeStruct`` leaves)."""
    return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


def merge_state(full: Mapping[str, Any], part: Mapping[str, Any]) -> dict:
    """``full`` with the leaves of ``part`` (a :meth:`Method.step_state` subset, possibly
    updated) written over it, nested dicts merged key by key."""
    out = dict(full)
    for key, value in part.items():
        if isinstance(value, Mapping) and isinstance(full.get(key), Mapping):
            out[key] = merge_state(full[key], value)
        else:
            out[key] = value
    return out


def label_current_task(per_task: Mapping[str, Any], task_index: int, label: str = "train"
                       ) -> dict:
    """Optimizer labels of a ``{task index as str: subtree}`` tree: ``label`` on every leaf of
    task ``task_index``'s subtree, ``'frozen'`` on every other task's (a per-task prompt, slice
    of components or classifier is trained while its task runs and never again)."""
    current = str(task_index)
    return {t: jax.tree_util.tree_map(lambda _, t=t: label if t == current else FROZEN, sub)
            for t, sub in per_task.items()}


def mask_current_task(per_task: Mapping[str, Any], task_index: Any) -> dict:
    """The :meth:`Method.update_mask` of a ``{task index as str: subtree}`` tree: 1 on every
    leaf of task ``task_index``'s subtree, 0 on every other task's. ``task_index`` may be
    traced -- the counterpart of :func:`label_current_task` for a step compiled once."""
    return {t: jax.tree_util.tree_map(
                lambda _, t=t: jnp.asarray(task_index == int(t), jnp.float32), sub)
            for t, sub in per_task.items()}


# ----------------------------------------------------------------------------- task data
class TaskData:
    """A task's training examples, un-augmented and in a fixed order, for passes outside the
    gradient steps (``before_task``: build an input subspace; ``after_task``: statistics,
    prototypes, closed-form heads).

    Functions receive a *batch* dict, sharded over the mesh along its first axis::

        {'inputs': (B, H, W, C) images, or for a text backbone {'token_ids',
                   'attention_mask'} (B, L) int32 arrays -- read through backbone.apply,
         'label': (B,) int32 remapped labels,
         'mask': (B,) float32, 1 for real examples and 0 for the padding of the last batch,
         'index': (B,) int32, the example's position in the task (0..num_examples-1)}

    Extra arrays a function needs (the frozen backbone, a projection matrix) are passed as
    ``*args`` so they are arguments of the compiled function, not constants baked into it.

    Compiled functions are kept for the run, keyed by ``fn``: a method that passes the same
    function every task -- a method of its own (``self.accumulate``) or a module-level
    function, not a closure made anew in each ``after_task`` -- compiles it once, as long
    as the argument shapes stay fixed (``capacity`` helps with per-example arrays).
    """

    def __init__(self, batches: Callable[[], Iterable[dict]], num_examples: int, *,
                 shard: Callable[[dict], dict], gather: Callable[[Any], Any],
                 replicated: jax.sharding.NamedSharding, capacity: Optional[int] = None,
                 compiled: Optional[dict] = None,
                 augmented_batches: Optional[Callable[[int], Iterable[dict]]] = None,
                 augments: bool = False):
        """``batches()`` yields this host's slice of each global batch (numpy); ``shard``
        turns it into global device arrays; ``gather`` fetches a global array to the host;
        ``replicated`` is the (1-D, batch-sharded) mesh's fully replicated sharding;
        ``capacity`` (>= ``num_examples``, default equal) is the largest task's example
        count in the run -- per-example arrays of that length keep their shape from task to
        task;
        ``compiled`` is the run's cache of compiled passes (shared across tasks);
        ``augmented_batches(epoch)`` yields the same examples through the training
        augmentation, a fresh draw for each ``epoch`` (see :meth:`augmented`; without it the
        augmented view is the plain one); ``augments`` says whether that view differs from
        the plain one (False: the run does not augment, and both views yield the same
        images)."""
        self._batches = batches
        if augments and augmented_batches is None:
            raise ValueError("TaskData(augments=True) needs the augmented_batches to read")
        self._augmented_batches = augmented_batches
        self.augments = bool(augments)
        self.num_examples = int(num_examples)
        self.capacity = int(capacity if capacity is not None else num_examples)
        if self.capacity < self.num_examples:
            raise ValueError(f"TaskData capacity {self.capacity} < its {self.num_examples} "
                             f"examples")
        self._shard = shard
        self._gather = gather
        self._replicated = replicated
        self._compiled = {} if compiled is None else compiled

    def augmented(self, epoch: int = 0) -> "TaskData":
        """The same examples, in the same order, through the run's training augmentation
        (random crops, flips; none when ``augment.enabled`` is off, see :attr:`augments`),
        for a method whose official code reads its augmented training loader outside the
        gradient steps (S-Prompts' k-means; HiDe-Prompt's task-identity head, one epoch of
        fresh draws after another). The draws come from the run's seed, the task and
        ``epoch``, so every call, and a resumed run, sees the same augmented images for
        the same epoch, and each epoch other ones."""
        if self._augmented_batches is None:  # built without augmentation: the plain view
            return self
        return TaskData(functools.partial(self._augmented_batches, int(epoch)),
                        self.num_examples, shard=self._shard, gather=self._gather,
                        replicated=self._replicated, capacity=self.capacity,
                        compiled=self._compiled)

    def replicate(self, tree: Any) -> Any:
        """``tree`` placed on every device of the mesh, as the passes take their arguments
        and their starting carry."""
        return jax.device_put(tree, self._replicated)

    def _jit(self, kind: str, fn: Callable, **options) -> Callable:
        key = (kind, fn)  # bound methods compare equal for the same object and function
        if key not in self._compiled:
            self._compiled[key] = compiler.jit(fn, **options)
        return self._compiled[key]

    def map(self, fn: Callable[..., Any], *args) -> Tuple[Any, np.ndarray]:
        """``fn(batch, *args) -> pytree of per-example arrays`` over every example; returns
        the outputs concatenated on the host (numpy, padding dropped) and the labels."""
        compiled = self._jit("map", fn)
        args = self.replicate(args)
        outputs, labels = [], []
        for local in self._batches():
            batch = self._shard(local)
            keep = np.asarray(self._gather(batch["mask"])) > 0
            out = self._gather(compiled(batch, *args))
            outputs.append(jax.tree_util.tree_map(lambda x: np.asarray(x)[keep], out))
            labels.append(np.asarray(self._gather(batch["label"]))[keep])
        stacked = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *outputs)
        return stacked, np.concatenate(labels)

    def reduce(self, fn: Callable[..., Any], init: Any, *args, additive: bool = False) -> Any:
        """Folds ``carry = fn(carry, batch, *args)`` over every batch on the devices and
        returns the final carry (device arrays, replicated on the mesh).

        ``fn`` is jit-compiled once. Padding rows have ``mask == 0``: ``fn`` must weight by
        it. Two ways to run it over a mesh of several devices:

        * ``additive=False``: the batch is sharded and the carry replicated, so a
          contraction over the batch axis (``h.T @ h``, a masked per-class sum) is summed
          across the mesh by the compiler at every batch; any fold is exact.
        * ``additive=True``, for a fold that only adds the batch's terms,
          ``fn(carry, batch) = carry + g(batch)`` (a Gram matrix, per-class sums -- every
          pass in pecft_jax): each device folds its own shard of every batch into a carry
          of its own (the first device's starts at ``init``, the others' at zero) and the
          carries are summed once, at the end, instead of across the mesh at every batch
          (for RanPAC's two 2,000 x 2,000 Gram matrices, 32 MB a batch). The result
          equals the other way's to float rounding (the order of the additions differs).
        """
        if additive:
            return self._reduce_per_device(fn, init, args)
        step = self._jit("reduce", fn, donate_argnums=0, out_shardings=self._replicated)
        # a copy: the steps donate the carry's buffers, and device_put may alias ``init``'s
        carry = jax.tree_util.tree_map(jnp.copy, self.replicate(init))
        args = self.replicate(args)
        for count, local in enumerate(self._batches(), 1):
            carry = step(carry, self._shard(local), *args)
            # each batch's program all-reduces the carry: XLA:CPU must not queue many
            compiler.bound_queue(count, carry)
        return carry

    def _reduce_per_device(self, fn: Callable[..., Any], init: Any, args: tuple) -> Any:
        mesh = self._replicated.mesh
        axis = mesh.axis_names[0]  # the loop's meshes are 1-D, batch-sharded
        per_device = jax.sharding.PartitionSpec(axis)
        whole = jax.sharding.PartitionSpec()
        if ("reduce_additive", fn) not in self._compiled:
            def first_device_only(tree):  # init on the first device, zeros on the others
                def place(x):
                    return jnp.where(jax.lax.axis_index(axis) == 0, x, jnp.zeros_like(x))[None]
                return jax.tree_util.tree_map(place, tree)

            def local_fold(carry, batch, *args):  # one device: its carry, its shard
                mine = jax.tree_util.tree_map(lambda c: c[0], carry)
                return jax.tree_util.tree_map(lambda c: c[None], fn(mine, batch, *args))

            def step(carry, batch, *args):
                # check_vma off: a method's fold may hold device-independent values (a
                # ``lax.cond`` branch of zeros) beside shard-dependent ones; every output is
                # per device by construction (out_specs), so the check has nothing to add
                return jax.shard_map(local_fold, mesh=mesh,
                                     in_specs=(per_device, per_device) + (whole,) * len(args),
                                     out_specs=per_device, check_vma=False)(carry, batch, *args)

            # both with the carry's sharding spelt out: on a one-device mesh the shard_map's
            # own output sharding differs from it, and the step would compile twice
            carry_sharding = jax.sharding.NamedSharding(mesh, per_device)
            self._compiled[("reduce_additive_start", fn)] = compiler.jit(jax.shard_map(
                first_device_only, mesh=mesh, in_specs=whole, out_specs=per_device),
                out_shardings=carry_sharding)
            self._compiled[("reduce_additive", fn)] = compiler.jit(
                step, donate_argnums=0, out_shardings=carry_sharding)
            self._compiled[("reduce_additive_total", fn)] = compiler.jit(
                lambda carry: jax.tree_util.tree_map(lambda c: c.sum(0), carry),
                out_shardings=self._replicated)
        start, step, total = (self._compiled[(kind, fn)] for kind in (
            "reduce_additive_start", "reduce_additive", "reduce_additive_total"))
        carry = start(self.replicate(init))  # new buffers on the devices: safe to donate
        args = self.replicate(args)
        for local in self._batches():
            carry = step(carry, self._shard(local), *args)
        return total(carry)

    def on_one_device(self, tree: Any) -> Any:
        """``tree`` (replicated device arrays, e.g. a :meth:`reduce` result, or host arrays)
        on one of this process's mesh devices, for dense algebra that does not split over
        the batch -- a linear solve, an eigendecomposition. A jitted function given
        replicated inputs runs whole on every device at once; on a CPU split into host
        devices those copies compete for the same cores (RanPAC's 17 ridge solves: 0.86 s
        on one device, 2.2 s replicated over two). A replicated array's local copy is
        taken as it is (no transfer). Every process computes the same result on its own
        device; fetch it (``np.asarray``) before it goes back into the state."""
        device = min(self._replicated.addressable_devices, key=lambda d: d.id)

        def place(x):
            if isinstance(x, jax.Array):
                if not x.sharding.is_fully_replicated:
                    raise ValueError(f"on_one_device takes replicated arrays (a reduce "
                                     f"result, the state); got one sharded as {x.sharding}")
                local = {s.device: s.data for s in x.addressable_shards}
                # committed to ``device`` in every case (an uncommitted array or a one-device
                # mesh's shard would otherwise give the algebra's jit another signature, and
                # so another compilation); the local copy is not copied again
                return jax.device_put(local.get(device, x.addressable_shards[0].data), device)
            return jax.device_put(x, device)

        return jax.tree_util.tree_map(place, tree)


# ----------------------------------------------------------------------------- method
class Method:
    """Base class. Subclasses set ``name`` and ``Config`` and override what they need."""
    name: str = "base"

    @dataclasses.dataclass(frozen=True)
    class Config:
        """The method's hyper-parameters with the paper's defaults (none here). A subclass's
        ``Config`` validates its values in ``__post_init__``."""

    #: which classes' logits are kept in the training loss ('task' = L2P-style masking of
    #: classes outside the current task, 'seen', or 'all').
    train_class_mask: str = "task"
    #: True when ``logits`` also returns the task it inferred for each example,
    #: ``(logits, task_pred)``; the loop then reports task-identity accuracy.
    infers_task: bool = False
    #: False when ``logits`` masks the classes of tasks not learnt yet (to -inf or a
    #: constant): an evaluation on future tasks (``eval.future_tasks``, FWT) would measure
    #: the mask, not transfer, so the loop refuses it for such a method.
    scores_unlearnt_classes: bool = True
    #: False (the default): ``loss`` / ``update`` / ``logits`` get the task with a *traced*
    #: index, so each kind of step compiles once per run; ``param_labels`` and
    #: ``optimizer_groups`` must then give the same optimizer for tasks with the same labels.
    #: True: a concrete TaskSpec (``task.classes``, Python control flow and shapes that depend
    #: on the task), at one compilation of each step per task.
    static_task: bool = False
    #: True when ``loss`` / ``logits`` / the ``TaskData`` passes read the frozen backbone's
    #: query through :func:`pecft_jax.methods.common.frozen_query`: the loop may then put it
    #: precomputed into the batch (``batch['frozen_query']``) for fixed, un-augmented inputs.
    uses_frozen_query: bool = False
    #: The task after whose ``after_task`` :meth:`fixed_features` never changes again (no
    #: later step or pass moves what it reads), or None. RanPAC and APER: 0, their
    #: first-session adapted feature. The loop may then compute each test set's fixed
    #: features once and put them into the evaluation batches (``batch['fixed_features']``),
    #: which ``logits`` reads through :func:`pecft_jax.methods.common.cached_fixed_features`.
    features_fixed_after: Optional[int] = None
    #: True when ``logits`` runs one pass per learnt task ``j`` (Progressive Prompts' prompts
    #: ``0..j``, EASE's subspace ``j``) whose features, :meth:`task_features`, never change
    #: once task ``j`` is learnt. The loop may then compute each (test set, pass) pair once,
    #: not after every later task, and put passes ``0..t`` into the evaluation batches
    #: (``batch['task_features']``, ``(B, num_tasks, task_feature_dim)``, the passes it
    #: does not read -- :meth:`scored_passes` -- zero), which ``logits`` reads through
    #: :func:`pecft_jax.methods.common.cached_task_features`.
    task_features_fixed: bool = False

    @property
    def predictions_depend_on_batch(self) -> bool:
        """True when an example's prediction depends on the others in its batch (L2P /
        DualPrompt batch-wise prompt selection): the loop then evaluates each task's test
        set in batches of its own, as the official code's per-task loaders do."""
        return False

    @property
    def batch_groups(self) -> Mapping[str, Tuple[int, str]]:
        """``{'train.batch_size' | 'eval.batch_size': (G, option)}`` where the method
        computes in groups of ``G`` consecutive examples of a batch, as the official code
        does on each device's share of it (L2P / DualPrompt's batch-wise vote, HiDe-Prompt's
        contrastive term per GPU), ``G`` set by the method config's ``option``: the trainer
        refuses a batch size that is not a multiple of ``G``, which would cut a group short
        and shift every later one. Empty: no groups."""
        return {}

    def __init__(self, config: Any, backbone: Backbone, num_classes: int, num_tasks: int):
        self.config = parse_config(self.Config, config, "config.method")
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_tasks = num_tasks

    # ------------------------------------------------------------- around tasks
    def init(self, rng: Array, frozen: Any) -> Tuple[dict, dict]:
        """Initial (trainable, state)."""
        raise NotImplementedError

    def before_task(self, task: TaskSpec, trainable: dict, state: dict, frozen: Any,
                    data: TaskData, rng: Array) -> Tuple[dict, dict]:
        """Before task ``task`` trains: add its parameters, build a subspace from ``data``..."""
        return trainable, state

    def train_epochs(self, task: TaskSpec, default: int) -> int:
        """Epochs of gradient steps on ``task`` (``default`` = ``config.train.epochs``).
        0 = none: no optimizer is built and no training step is compiled."""
        return default

    def after_task(self, task: TaskSpec, trainable: dict, state: dict, frozen: Any,
                   data: TaskData, rng: Array) -> Tuple[dict, dict]:
        """After the task's gradient steps: statistics, closed-form heads, merging or
        replacing trainables. Returns the new ``(trainable, state)``."""
        return trainable, state

    # ------------------------------------------------------------------ optimiser
    def param_labels(self, trainable: dict, task: TaskSpec) -> Any:
        """Label per trainable leaf; 'frozen' leaves never enter ``jax.grad``. Default: all
        'train'. (``config.train.lr_mults`` refines these by path regex.)"""
        return jax.tree_util.tree_map(lambda _: "train", trainable)

    def optimizer_groups(self, task: TaskSpec, base: optax.GradientTransformation
                         ) -> Mapping[str, optax.GradientTransformation]:
        """Transform per label. Override for per-group learning rates."""
        return {"train": base}

    def run_long_groups(self, task: TaskSpec) -> Tuple[str, ...]:
        """The groups whose Adam step count runs over the whole sequence under
        ``train.optimizer_scope='run'`` (one optimizer for the run, as some official codes
        keep): those whose parameters are, officially, the new slices of one tensor that
        every task trains a part of -- PyTorch counts Adam's steps per tensor, so the new
        slice starts at the run's step count, with zero moments. Default: none (every
        group's tensors are new with their task and start at step 1)."""
        return ()

    def group_start_epochs(self, task: TaskSpec) -> Mapping[str, int]:
        """``{label: epoch}``: the group learns from that epoch of the task on, zero updates
        before and its optimizer state started then (``partition.start_after``; LAE trains
        only the new head for a task's first epochs). Default: every group from the start.
        Groups that start later compile a train step of their own."""
        return {}

    # ------------------------------------------------------------------- traced
    def loss(self, trainable: dict, state: dict, frozen: Any, batch: Mapping[str, Array],
             rng: Array, task: TaskSpec) -> Tuple[Array, dict]:
        """Returns (scalar loss, aux). aux['metrics']: dict of scalars to log;
        aux['state']: optional new state (e.g. selection counts)."""
        raise NotImplementedError

    def update(self, trainable: dict, state: dict, opt_state: Any, frozen: Any,
               batch: Mapping[str, Array], rng: Array, task: TaskSpec, optimizer: Any
               ) -> Tuple[dict, dict, Any, dict]:
        """One training step; the loop jit-compiles it, shards the batch and donates
        ``trainable``, ``state`` and ``opt_state``. ``optimizer`` (a
        :class:`pecft_jax.train.partition.RoutedOptimizer`) splits the trainable tree into
        the leaves that learn and the 'frozen' ones, and updates the former.

        Override to change the gradients (project them onto a subspace held in ``state``)
        or to act after the update (an EMA copy): the two halves are public. Leaves that
        :meth:`update_mask` zeroes get neither gradient nor update."""
        grads, aux = self.gradients(trainable, state, frozen, batch, rng, task, optimizer)
        mask = self.update_mask(trainable, task)
        if mask is not None:
            mask = optimizer.split(mask)[0]
            grads = jax.tree_util.tree_map(lambda g, m: g * m, grads, mask)
        return self.apply_gradients(trainable, state, opt_state, grads, aux, optimizer, mask)

    def update_mask(self, trainable: dict, task: TaskSpec) -> Any:
        """``None`` (every learning leaf learns), or a tree like ``trainable`` of 0/1 values
        that may depend on the traced task index: the leaves at 0 get a zero gradient and a
        zero update this step, so they stay bit-identical whatever the optimizer (coupled
        weight decay may still enter their moments, which the loop resets every task). With
        it a per-task slice of a fixed-size tree learns only while its task trains, under one
        compiled step for every task -- what 'frozen' labels (:meth:`param_labels`, which are
        static) would otherwise do per task."""
        return None

    def gradients(self, trainable, state, frozen, batch, rng, task, optimizer
                  ) -> Tuple[Any, dict]:
        """``(grads of the learning leaves, aux)``; aux holds 'loss', 'metrics', 'state'."""
        learning, fixed = optimizer.split(trainable)

        def loss_fn(params):
            return self.loss(optimizer.merge(params, fixed), state, frozen, batch, rng, task)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(learning)
        return grads, dict(aux, loss=loss)

    def apply_gradients(self, trainable, state, opt_state, grads, aux, optimizer, mask=None
                        ) -> Tuple[dict, dict, Any, dict]:
        learning, fixed = optimizer.split(trainable)
        updates, opt_state = optimizer.transform.update(grads, opt_state, learning)
        if mask is not None:  # exact: weight decay or momentum must not move masked leaves
            updates = jax.tree_util.tree_map(lambda u, m: u * m, updates, mask)
        trainable = optimizer.merge(optax.apply_updates(learning, updates), fixed)
        new_state = aux.get("state")
        metrics = dict(aux.get("metrics", {}), loss=aux["loss"])
        return trainable, (state if new_state is None else new_state), opt_state, metrics

    def logits(self, trainable: dict, state: dict, frozen: Any, batch: Mapping[str, Array],
               task: TaskSpec) -> Any:
        """Evaluation logits of ``batch['inputs']`` over all ``num_classes`` classes (the loop
        masks unseen ones); ``(logits, task_pred)`` when the method ``infers_task``. ``batch``
        may also hold ``'frozen_query'`` (see ``uses_frozen_query``)."""
        raise NotImplementedError

    def fixed_features(self, trainable: dict, frozen: Any, inputs: Any) -> Array:
        """``(B, fixed_feature_dim)`` features of ``inputs`` that stop changing after task
        ``features_fixed_after`` (only called for a method that sets it)."""
        raise NotImplementedError(f"{type(self).__name__} sets features_fixed_after but "
                                  f"does not define fixed_features")

    @property
    def fixed_feature_dim(self) -> int:
        """The width of :meth:`fixed_features` (default: the backbone's feature width)."""
        return self.backbone.feature_dim

    def task_features(self, trainable: dict, state: dict, frozen: Any, inputs: Any,
                      task: TaskSpec) -> Array:
        """``(B, task_feature_dim)``: the features of ``inputs`` in task ``task.index``'s
        pass, given that task's spec (traced index, or concrete for a ``static_task``
        method), once it is learnt (only called for a method that sets
        ``task_features_fixed``)."""
        raise NotImplementedError(f"{type(self).__name__} sets task_features_fixed but does "
                                  f"not define task_features")

    def scored_passes(self, task: TaskSpec) -> Tuple[int, ...]:
        """The learnt tasks whose passes ``logits`` reads after task ``task.index`` (a
        concrete spec; default: all of them, ``0..t``). Only these are computed for the
        cache (``task_features_fixed``)."""
        return tuple(range(int(task.index) + 1))

    @property
    def task_feature_dim(self) -> int:
        """The width of :meth:`task_features` (default: the backbone's feature width)."""
        return self.backbone.feature_dim

    def step_state(self, state: dict) -> dict:
        """The part of ``state`` that the traced ``loss`` / ``update`` / ``logits`` read: the
        loop passes only this into the compiled steps and merges what ``update`` returns back
        into the full state (dicts merged key by key). Default: all of it. Override to keep
        large statistics the steps never read (HiDe-Prompt's per-class covariances) out of
        every step's arguments."""
        return state

    # ------------------------------------------------------------------- reports
    def count_trainable(self, trainable: dict, state: dict) -> int:
        """Learnt parameters reported in results.json. Default: the trainable tree; methods
        that also learn outside the gradient steps (a head fitted in ``after_task``) add it."""
        return count_params(trainable)

    # ------------------------------------------------------------------- helpers
    def masked_ce(self, logits: Array, batch: Mapping[str, Array], task: TaskSpec) -> Array:
        """Cross-entropy of ``batch['label']`` over the classes of :attr:`train_class_mask`,
        the mean over the batch's examples (its ``'mask'``, when it has one: an epoch's kept
        partial batch is padded, ``train.drop_last=False``)."""
        return cross_entropy(mask_logits(logits, task.class_mask(self.train_class_mask)),
                             batch["label"], batch.get("mask"))

    def train_accuracy(self, logits: Array, batch: Mapping[str, Array], task: TaskSpec
                       ) -> Array:
        """Batch accuracy over the classes the training loss sees (what is optimised; the
        class-IL accuracy over all seen classes is what the evaluation reports)."""
        return batch_accuracy(mask_logits(logits, task.class_mask(self.train_class_mask)),
                              batch["label"], batch.get("mask"))
