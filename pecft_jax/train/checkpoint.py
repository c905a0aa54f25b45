"""Orbax checkpoints of a continual run: what was trained, never the frozen backbone.

Layout in ``workdir/checkpoints/``::

    tasks/<t>/    after task t finished (kept: `evaluate --task t` reads them)
    latest/<n>/   every N steps inside a task, n = global step (only the newest is kept)

Each checkpoint holds two items: ``arrays`` (trainable pytree, method state, optimizer
state, PRNG key; stored as one flat ``{path: array}`` dict so empty or nested trees of any
shape survive a target-free restore) and ``meta`` (JSON: position in the run, accuracy
matrices so far, backbone fingerprint, config hash).

Integrity: ``meta`` carries a SHA-256 of every array (dtype, shape and bytes) and one of
itself; both are checked when a checkpoint is read, so a damaged file is an error naming
the checkpoint (and the one to fall back to), never a restore of wrong values.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from pecft_jax.train.mesh import to_host

log = logging.getLogger("pecft_jax")
SEP = "/"
_SENTINEL = "__checkpoint__"


class CheckpointMismatch(ValueError):
    """A checkpoint does not belong to this run's backbone or config."""


class CheckpointCorrupt(CheckpointMismatch):
    """A checkpoint's files are damaged: unreadable, or their contents fail the checksums."""


def array_digest(value: Any) -> str:
    """SHA-256 of an array's dtype, shape and bytes (hex)."""
    array = np.ascontiguousarray(np.asarray(value))
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.tobytes())
    return h.hexdigest()


def _meta_digest(meta: Mapping) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def flatten_tree(tree: Mapping, prefix: str = "") -> dict:
    """Nested dicts with string keys -> {'a/b/c': leaf}. Leaves must be arrays."""
    flat = {}
    if not isinstance(tree, Mapping):
        raise TypeError(f"checkpointed trees must be nested dicts of arrays; found "
                        f"{type(tree).__name__} at {prefix or '<root>'!r}")
    for key, value in tree.items():
        if not isinstance(key, str) or SEP in key:
            raise TypeError(f"checkpointed dict keys must be strings without {SEP!r}; found "
                            f"{key!r} at {prefix or '<root>'!r}")
        path = f"{prefix}{SEP}{key}" if prefix else key
        if isinstance(value, Mapping):
            if not value:
                # marks an empty dict (one element: orbax refuses zero-size arrays)
                flat[path + SEP] = np.zeros((1,), np.int8)
            else:
                flat.update(flatten_tree(value, path))
        else:
            flat[path] = value
    return flat


def unflatten_tree(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        parts = path.split(SEP)
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if parts[-1]:  # '' marks an empty dict, already created above
            node[parts[-1]] = value
    return tree


def _paths_of(tree: Any) -> list:
    return [jax.tree_util.keystr(path) for path, _ in
            jax.tree_util.tree_flatten_with_path(tree)[0]]


class Checkpointer:
    def __init__(self, workdir: str):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self._tasks = ocp.CheckpointManager(
            os.path.join(self.directory, "tasks"),
            options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True))
        self._latest = ocp.CheckpointManager(
            os.path.join(self.directory, "latest"),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

    # ----------------------------------------------------------------- saving
    def _pack(self, trainable, state, opt_state, rng) -> dict:
        arrays = {_SENTINEL: np.zeros((), np.int32)}
        for name, tree in (("trainable", trainable), ("state", state)):
            for path, leaf in flatten_tree(to_host(tree)).items():
                arrays[f"{name}{SEP}{path}"] = leaf
        if opt_state is not None:
            for path, leaf in zip(_paths_of(opt_state), jax.tree_util.tree_leaves(opt_state)):
                arrays[f"opt_state{SEP}{path}"] = np.asarray(jax.device_get(leaf))
        arrays["rng"] = np.asarray(jax.random.key_data(rng))
        return arrays

    def save(self, *, task_end: bool, step: int, trainable, state, opt_state, rng,
             meta: Mapping) -> None:
        manager = self._tasks if task_end else self._latest
        arrays = self._pack(trainable, state, opt_state if not task_end else None, rng)
        # the JSON round trip first, so the digest is of exactly what a reader gets back
        meta = json.loads(json.dumps(dict(meta)))
        meta["array_sha256"] = {key: array_digest(value) for key, value in arrays.items()}
        meta["meta_sha256"] = _meta_digest(meta)
        manager.save(step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                                   meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()

    # ---------------------------------------------------------------- reading
    def task_steps(self) -> list:
        return list(self._tasks.all_steps())

    def latest(self) -> Optional[tuple]:
        """The newest checkpoint as ('tasks'|'latest', step, meta), or None."""
        candidates = []
        for kind, manager in (("tasks", self._tasks), ("latest", self._latest)):
            step = manager.latest_step()
            if step is not None:
                meta = self.read_meta(kind, step)
                candidates.append((meta["global_step"], kind == "tasks", kind, step, meta))
        if not candidates:
            return None
        # A task-end checkpoint at the same global step is the more complete one.
        _, _, kind, step, meta = max(candidates)
        return kind, step, meta

    def read_meta(self, kind: str, step: int) -> dict:
        manager = self._tasks if kind == "tasks" else self._latest
        if step not in manager.all_steps():
            raise FileNotFoundError(f"no checkpoint {kind}/{step} in {self.directory}; "
                                    f"available: {sorted(manager.all_steps())}")
        try:
            restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = dict(restored["meta"])
        except Exception as err:  # orbax raises several types for damaged files
            raise self._corrupt(kind, step, f"unreadable ({type(err).__name__}: {err})") from err
        expected = meta.pop("meta_sha256", None)
        if expected is None:
            # written before checksums existed: nothing to check it against
            log.warning("checkpoint %s/%d in %s has no checksums", kind, step, self.directory)
        elif _meta_digest(meta) != expected:
            raise self._corrupt(kind, step, "its metadata fails its SHA-256")
        return meta

    def _corrupt(self, kind: str, step: int, what: str) -> CheckpointCorrupt:
        """The error for a damaged checkpoint, naming the one a run would fall back to."""
        earlier = sorted(s for s in self._tasks.all_steps() if kind == "latest" or s < step)
        fallback = (f"the run then resumes from tasks/{earlier[-1]}" if earlier
                    else "the run then starts from the beginning")
        path = os.path.join(self.directory, kind, str(step))
        return CheckpointCorrupt(f"checkpoint {kind}/{step} in {self.directory} is damaged: "
                                 f"{what}. Delete {path} to go back to the previous "
                                 f"checkpoint ({fallback}).")

    def restore(self, kind: str, step: int, opt_state_target: Any = None) -> dict:
        """Returns dict(trainable, state, opt_state, rng, meta).

        ``opt_state_target`` is a freshly initialised optimizer state for the restored
        trainable tree; its structure tells how to rebuild the saved leaves. Without it (and
        for task-end checkpoints, which hold none) ``opt_state`` is None."""
        manager = self._tasks if kind == "tasks" else self._latest
        meta = self.read_meta(kind, step)  # checks the metadata's own digest
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        except Exception as err:
            raise self._corrupt(kind, step, f"unreadable ({type(err).__name__}: {err})") from err
        arrays = {k: np.asarray(v) for k, v in restored["arrays"].items()}
        digests = meta.pop("array_sha256", None)
        if digests is not None:
            if set(digests) != set(arrays):
                odd = sorted(set(arrays) ^ set(digests))[:3]
                raise self._corrupt(kind, step, f"its arrays and the checksum list differ ({odd})")
            bad = [key for key, value in arrays.items() if array_digest(value) != digests[key]]
            if bad:
                raise self._corrupt(kind, step, f"array(s) {bad[:3]} fail their SHA-256")
        groups: dict = {"trainable": {}, "state": {}, "opt_state": {}}
        for key, value in arrays.items():
            head, _, rest = key.partition(SEP)
            if head in groups:
                groups[head][rest] = value
        opt_state = None
        if groups["opt_state"] and opt_state_target is not None:
            paths = _paths_of(opt_state_target)
            missing = [p for p in paths if p not in groups["opt_state"]]
            if missing or len(paths) != len(groups["opt_state"]):
                raise CheckpointMismatch(
                    f"the optimizer state in {kind}/{step} does not fit this run's optimizer "
                    f"(missing {missing[:3]}); was the optimizer or method config changed, "
                    f"or the checkpoint written by another pecft_jax version? Resume it "
                    f"with the config and version that wrote it, or start the task over from "
                    f"its last task-end checkpoint (delete checkpoints/latest)")
            treedef = jax.tree_util.tree_structure(opt_state_target)
            opt_state = jax.tree_util.tree_unflatten(treedef,
                                                     [groups["opt_state"][p] for p in paths])
        return {"trainable": unflatten_tree(groups["trainable"]),
                "state": unflatten_tree(groups["state"]),
                "opt_state": opt_state,
                "rng": jax.random.wrap_key_data(arrays["rng"]),
                "meta": meta}

    def close(self) -> None:
        self._tasks.close()
        self._latest.close()
