"""The frozen/trainable partition and optimizers that route gradients by label.

Representation: parameter trees are nested dicts (``Mapping``s); anything that is not a
Mapping is a leaf (arrays, ``jax.ShapeDtypeStruct``s, ...). :func:`split` returns two trees
in which the other side's leaves are *absent* (and sub-dicts left empty are dropped). So a
training step over a whole parameter tree can be written as::

    trainable, frozen = split(params, labels)
    grads = jax.grad(loss)(trainable, frozen, batch)   # only argnum 0 is differentiated

and the frozen tree never enters ``jax.grad`` or the optimizer state.

Inside a method's trainable tree the same rule holds per leaf: :func:`make_optimizer`
returns a :class:`RoutedOptimizer` whose ``split`` cuts the ``'frozen'``-labelled leaves
(an old task's prompt, a backbone block frozen by ``train.lr_mults``) out of what is
differentiated -- keeping the tree's structure, with ``None`` in their place -- and
:func:`apply_lr_mults` turns the config's ``(regex, multiplier)`` rules into labels and
learning-rate groups.

Paths are the dict keys joined by ``'/'`` (int keys as their decimal string), e.g.
``'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'`` or ``'lora/3/query/A'``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any, Callable, Collection, Iterator, Mapping, Optional, Sequence, Tuple, Union

import jax
import optax

PyTree = Any
Predicate = Callable[[str, Any], bool]
Rules = Union[Mapping[str, str], Sequence[Tuple[str, str]]]
FROZEN = "frozen"


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}/{key}" if prefix else str(key)


def iter_leaves(tree: PyTree, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """``(path, leaf)`` pairs of a nested-dict tree, in key-insertion order."""
    if isinstance(tree, Mapping):
        for key, sub in tree.items():
            yield from iter_leaves(sub, _join(prefix, key))
    else:
        yield prefix, tree


def _map_with_path(fn: Callable[[str, Any], Any], tree: PyTree, prefix: str = "") -> PyTree:
    if isinstance(tree, Mapping):
        return {key: _map_with_path(fn, sub, _join(prefix, key)) for key, sub in tree.items()}
    return fn(prefix, tree)


def _select(tree: PyTree, keep: Callable[[str, Any], bool], prefix: str = "") -> Optional[dict]:
    """The sub-tree of leaves where ``keep`` is True; None if nothing is kept."""
    out = {}
    for key, sub in tree.items():
        path = _join(prefix, key)
        if isinstance(sub, Mapping):
            picked = _select(sub, keep, path)
            if picked:
                out[key] = picked
        elif keep(path, sub):
            out[key] = sub
    return out or None


def _labels_by_path(params: PyTree, labels: PyTree) -> dict:
    """Check ``labels`` mirrors ``params`` and index its labels by path."""
    param_paths = [p for p, _ in iter_leaves(params)]
    label_map = dict(iter_leaves(labels))
    missing = [p for p in param_paths if p not in label_map]
    extra = sorted(set(label_map) - set(param_paths))
    if missing or extra:
        raise ValueError(f"labels must have the same structure as params; params leaves without "
                         f"a label: {missing[:5]}, labels without a param: {extra[:5]} (build "
                         f"them with label_tree(params, rules))")
    bad = {p: lab for p, lab in label_map.items() if not isinstance(lab, str)}
    if bad:
        raise ValueError(f"labels must be strings, got {list(bad.items())[:3]}")
    return label_map


def split(params: PyTree, predicate_or_labels: Union[Predicate, PyTree], *,
          frozen_label: str = FROZEN) -> Tuple[dict, dict]:
    """Split ``params`` into ``(trainable, frozen)`` nested dicts.

    Args:
      params: nested dict of leaves.
      predicate_or_labels: either ``predicate(path, leaf) -> bool`` (True = trainable) or a
        labels tree of the same structure (from :func:`label_tree`); leaves labelled
        ``frozen_label`` go to the frozen side, every other label to the trainable side.
      frozen_label: the label meaning "frozen".

    Returns:
      Two nested dicts; a leaf sits in exactly one of them. Empty sides are ``{}``.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"split expects a nested dict of parameters, got {type(params).__name__}")
    if callable(predicate_or_labels) and not isinstance(predicate_or_labels, Mapping):
        predicate = predicate_or_labels

        def is_trainable(path, leaf):
            return bool(predicate(path, leaf))
    else:
        label_map = _labels_by_path(params, predicate_or_labels)

        def is_trainable(path, leaf):
            return label_map[path] != frozen_label
    trainable = _select(params, is_trainable) or {}
    frozen = _select(params, lambda path, leaf: not is_trainable(path, leaf)) or {}
    return trainable, frozen


def merge(trainable: PyTree, frozen: PyTree) -> dict:
    """Inverse of :func:`split`: the union of two disjoint nested dicts (error on overlap)."""
    def union(a: Mapping, b: Mapping, prefix: str) -> dict:
        out = dict(a)
        for key, sub in b.items():
            path = _join(prefix, key)
            if key not in out:
                out[key] = sub
            elif isinstance(out[key], Mapping) and isinstance(sub, Mapping):
                out[key] = union(out[key], sub, path)
            else:
                raise ValueError(f"merge: {path!r} is present in both trees; trainable and frozen "
                                 f"parts must be disjoint")
        return out

    for name, tree in (("trainable", trainable), ("frozen", frozen)):
        if not isinstance(tree, Mapping):
            raise TypeError(f"merge expects nested dicts; {name} is {type(tree).__name__}")
    return union(trainable, frozen, "")


def label_tree(params: PyTree, rules: Rules, *, default: Optional[str] = None) -> dict:
    """Label every leaf by the first rule whose regex is found (``re.search``) in its path.

    Args:
      params: nested dict of leaves (arrays or shape structs).
      rules: ordered ``{regex: label}`` or ``[(regex, label), ...]``; first match wins.
      default: label of leaves no rule matches; None makes unmatched leaves an error.

    Example::

        label_tree(params, [(r"^backbone/", "frozen"), (r"^lora/0/", "old"), (r".*", "lora")])
    """
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    compiled = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"rules must be (regex, label) pairs, got {item!r}")
        pattern, label = item
        try:
            compiled.append((re.compile(pattern), label))
        except re.error as err:
            raise ValueError(f"invalid rule regex {pattern!r}: {err}") from None
    unmatched = []

    def label_of(path: str, leaf: Any) -> Optional[str]:
        for pattern, label in compiled:
            if pattern.search(path):
                return label
        if default is None:
            unmatched.append(path)
        return default

    labels = _map_with_path(label_of, params)
    if unmatched:
        raise ValueError(f"no rule matches {len(unmatched)} leaves, e.g. {unmatched[:5]}; add a "
                         f"rule (e.g. ('.*', 'frozen') last) or pass default=")
    return labels


def _is_transformation(obj: Any) -> bool:
    return isinstance(obj, optax.GradientTransformation) or (
        hasattr(obj, "init") and hasattr(obj, "update") and callable(obj.update))


def _is_none(x: Any) -> bool:
    return x is None


@dataclasses.dataclass(frozen=True)
class RoutedOptimizer:
    """An optimizer over the leaves of a trainable tree that learn, routed by label.

    ``labels`` mirrors the trainable tree (string leaves). Leaves labelled ``'frozen'``
    are cut out by :meth:`split` -- they never enter ``jax.grad`` and hold no optimizer
    state -- and every other label's leaves get ``transform``'s group of that name. The
    split keeps the tree's structure (cut leaves become ``None``), so :meth:`merge` gives
    back exactly the tree a method's loss expects, empty sub-dicts included.
    """
    labels: PyTree
    transform: optax.GradientTransformation

    def split(self, trainable: PyTree) -> Tuple[PyTree, PyTree]:
        """``(learning, fixed)``: the same structure, each with the other's leaves None."""
        learning = jax.tree_util.tree_map(lambda lab, x: None if lab == FROZEN else x,
                                          self.labels, trainable)
        fixed = jax.tree_util.tree_map(lambda lab, x: x if lab == FROZEN else None,
                                       self.labels, trainable)
        return learning, fixed

    @staticmethod
    def merge(learning: PyTree, fixed: PyTree) -> PyTree:
        return jax.tree_util.tree_map(lambda a, b: b if a is None else a, learning, fixed,
                                      is_leaf=_is_none)

    def init(self, trainable: PyTree) -> Any:
        return self.transform.init(self.split(trainable)[0])


def make_optimizer(labels: PyTree, groups: Mapping[str, Any], *, frozen_label: str = FROZEN,
                   default_optimizer: Callable[[Any], optax.GradientTransformation] = optax.adam,
                   clip_norm: Optional[float] = None) -> RoutedOptimizer:
    """One optimizer routing each label's leaves to its own transformation.

    Args:
      labels: labels tree mirroring the trainable tree (e.g. from :func:`label_tree`).
      groups: ``{label: transformation}``; a number or a schedule instead of a
        transformation means ``default_optimizer(that learning rate)``.
      frozen_label: leaves with this label are not optimised at all (see
        :class:`RoutedOptimizer`); it must not be in ``groups``.
      default_optimizer: factory for groups given as a learning rate (default Adam).
      clip_norm: if set, the gradients of every learning leaf are first scaled together to
        at most this global norm -- one norm over all groups, as PyTorch's
        ``clip_grad_norm_(model.parameters())`` and optax's ``clip_by_global_norm`` over a
        whole tree take it -- before each group's transformation. A group held back by
        :func:`start_after` still counts in the norm while it waits.

    A label in ``labels`` without a group is an error, listing what is missing.
    """
    if frozen_label != FROZEN:
        labels = jax.tree_util.tree_map(lambda lab: FROZEN if lab == frozen_label else lab,
                                        labels)
    if frozen_label in groups:
        raise ValueError(f"{frozen_label!r} leaves are never optimised; remove it from groups "
                         f"(or name your trainable group differently)")
    transforms = {}
    for label, spec in groups.items():
        if _is_transformation(spec):
            transforms[label] = spec
        elif isinstance(spec, numbers.Real) or callable(spec):
            transforms[label] = default_optimizer(spec)
        else:
            raise TypeError(f"group {label!r}: expected an optax transformation, a learning rate "
                            f"or a schedule, got {type(spec).__name__}")
    used = {label for _, label in iter_leaves(labels)} - {FROZEN}
    missing = sorted(str(label) for label in used - set(transforms))
    if missing:
        raise ValueError(f"labels {missing} have no optimizer group; groups cover "
                         f"{sorted(transforms)}")
    learning_labels = jax.tree_util.tree_map(lambda lab: None if lab == FROZEN else lab, labels)
    transform = optax.multi_transform({k: v for k, v in transforms.items() if k in used},
                                      learning_labels)
    if clip_norm:
        transform = optax.chain(optax.clip_by_global_norm(clip_norm), transform)
    return RoutedOptimizer(labels, transform)


def start_after(inner: optax.GradientTransformation, steps: int
                ) -> optax.GradientTransformation:
    """``inner`` from its ``steps``-th call on; before that, zero updates and ``inner``'s
    state untouched -- a parameter group held frozen for the first ``steps`` steps whose
    optimizer state (Adam's moments and step count) starts when it starts learning, as a
    PyTorch parameter with ``requires_grad=False`` (LAE's first epochs of a task). A
    learning-rate schedule inside ``inner`` starts late too (PyTorch's would have run on);
    the gradients of the waiting group are still computed, then dropped."""
    import jax.numpy as jnp  # local: the rest of this module needs no jax.numpy

    if steps <= 0:
        return inner

    def init(params):
        # the start is state, not a constant of the compiled update: tasks of other lengths
        # (another number of steps to wait) share one compiled step
        return (jnp.zeros((), jnp.int32), jnp.asarray(steps, jnp.int32), inner.init(params))

    def update(updates, state, params=None):
        count, start, inner_state = state
        new_updates, new_inner = inner.update(updates, inner_state, params)
        active = count >= start
        updates = jax.tree_util.tree_map(lambda u: jnp.where(active, u, jnp.zeros_like(u)),
                                         new_updates)
        inner_state = jax.tree_util.tree_map(lambda n, o: jnp.where(active, n, o), new_inner,
                                             inner_state)
        return updates, (jnp.minimum(count + 1, start), start, inner_state)

    return optax.GradientTransformation(init, update)


def with_lengths(build: Callable[..., optax.GradientTransformation],
                 lengths: Sequence[int]) -> optax.GradientTransformation:
    """``build(*lengths)`` -- an optimizer whose learning-rate schedule is built from a
    task's lengths (steps, epochs, steps per epoch) -- with the lengths in its state, not
    constants of the compiled update: tasks of other lengths share one compiled train
    step. ``build`` must give the same state structure for any lengths (it is called with
    the int32 arrays of the state inside the update)."""
    import jax.numpy as jnp  # local: the rest of this module needs no jax.numpy

    def init(params):
        return (tuple(jnp.asarray(n, jnp.int32) for n in lengths),
                build(*(int(n) for n in lengths)).init(params))

    def update(updates, state, params=None):
        held, inner_state = state
        updates, inner_state = build(*held).update(updates, inner_state, params)
        return updates, (held, inner_state)

    return optax.GradientTransformation(init, update)


def continue_counts(opt_state: Any, steps_before: Any, adam_groups: Sequence[str] = ()
                    ) -> Any:
    """A task's fresh optimizer state as one optimizer over the whole run would hold it
    after ``steps_before`` updates in the earlier tasks, for parameters that never had a
    gradient before: the learning-rate schedules' step counts (``ScaleByScheduleState``)
    of every group and the Adam step counts (``ScaleByAdamState``) of ``adam_groups`` set to
    ``steps_before``; the moments stay zero, as such parameters' moments are. The other
    groups' Adam counts stay 0 (PyTorch keeps a step count per tensor: a tensor that
    starts learning with this task starts at step 1). Counts held by :func:`start_after`
    (how long a group waits) are its own and unchanged. ``steps_before``: an int, or an
    int32 traced in the compiled program that initialises the state."""
    import jax.numpy as jnp  # local: the rest of this module needs no jax.numpy

    groups, with_adam = set(adam_groups), set()
    counted = (optax.ScaleByScheduleState, optax.ScaleByAdamState)

    def group_of(path) -> Optional[str]:
        for key in path:  # the label multi_transform keys each group's state by
            if isinstance(key, jax.tree_util.DictKey) and isinstance(key.key, str):
                return key.key
        return None

    def carry_on(path, node):
        if isinstance(node, optax.ScaleByAdamState):
            with_adam.add(group_of(path))
            if group_of(path) not in groups:
                return node
        elif not isinstance(node, optax.ScaleByScheduleState):
            return node  # a leaf outside the counted states
        return node._replace(count=jnp.full_like(node.count, steps_before))

    state = jax.tree_util.tree_map_with_path(
        carry_on, opt_state, is_leaf=lambda node: isinstance(node, counted))
    if groups - with_adam:
        raise ValueError(f"continue_counts: no Adam state for groups "
                         f"{sorted(groups - with_adam)} (groups with one: "
                         f"{sorted(g for g in with_adam if g)}); a run-long step count "
                         f"needs train.optimizer 'adam', 'adamw' or 'transformers_adamw'")
    return state


def parse_lr_mults(rules: Any) -> Tuple[Tuple[str, float], ...]:
    """``config.train.lr_mults`` as ``((regex, multiplier), ...)``; clear errors otherwise."""
    parsed = []
    for item in rules or ():
        if not (isinstance(item, (tuple, list)) and len(item) == 2
                and isinstance(item[0], str) and isinstance(item[1], numbers.Real)):
            raise ValueError(f"train.lr_mults must be (regex, multiplier) pairs, e.g. "
                             f"[('^backbone/', 0.01), ('^head/', 1.0)]; got {item!r}")
        try:
            re.compile(item[0])
        except re.error as err:
            raise ValueError(f"train.lr_mults: invalid regex {item[0]!r}: {err}") from None
        if item[1] < 0:
            raise ValueError(f"train.lr_mults: multiplier of {item[0]!r} must be >= 0 (0 "
                             f"freezes), got {item[1]}")
        parsed.append((item[0], float(item[1])))
    return tuple(parsed)


def apply_lr_mults(labels: PyTree, rules: Sequence[Tuple[str, float]]) -> Tuple[PyTree, dict]:
    """Refine a method's labels by path regex, the big_vision way.

    The first rule whose regex is found in a leaf's path sets its learning-rate multiplier;
    leaves no rule matches keep x1. Multiplier 0 freezes the leaf (it leaves ``jax.grad``);
    another multiplier ``m`` relabels ``L`` as ``'L*m'``. Returns the new labels and
    ``{new label: (base label, m)}`` for the groups to build (``chain(group[L], scale(m))``:
    the same as the group's learning rate times ``m`` for SGD, momentum, Adam(W); for
    ``transformers_adamw``, which decays the stepped parameters, up to its second-order
    ``lr^2 wd`` term, which this scales by ``m`` where a PyTorch group at ``m lr`` has
    ``m^2``).
    """
    derived: dict = {}

    def relabel(path: str, label: str) -> str:
        if label == FROZEN:
            return label
        mult = next((m for pattern, m in rules if re.search(pattern, path)), 1.0)
        if mult == 0.0:
            return FROZEN
        if mult == 1.0:
            return label
        name = f"{label}*{mult:g}"  # (base_label undoes it)
        derived[name] = (label, mult)
        return name

    return _map_with_path(relabel, labels), derived


def base_label(label: str) -> str:
    """The method's label a group of :func:`apply_lr_mults` derives from (``'L*m'`` -> L)."""
    return label.split("*", 1)[0]


def count_params(tree: PyTree, labels: Optional[PyTree] = None,
                 label: Union[None, str, Collection[str]] = None) -> int:
    """Number of scalars in ``tree`` (arrays or ``ShapeDtypeStruct`` leaves, so
    ``jax.eval_shape`` trees count without allocating), optionally only the leaves whose
    label (from ``labels``) is ``label`` (or is in a collection of labels)."""
    def size(leaf: Any) -> int:
        shape = getattr(leaf, "shape", None)
        if shape is None:
            raise TypeError(f"count_params: leaf of type {type(leaf).__name__} has no shape")
        return int(math.prod(shape))

    if label is None:
        if labels is not None:
            raise ValueError("count_params got labels but no label to count; pass label=")
        return sum(size(leaf) for _, leaf in iter_leaves(tree))
    if labels is None:
        raise ValueError("count_params(label=...) needs the labels tree too")
    wanted = {label} if isinstance(label, str) else set(label)
    label_map = _labels_by_path(tree, labels)
    return sum(size(leaf) for path, leaf in iter_leaves(tree) if label_map[path] in wanted)
