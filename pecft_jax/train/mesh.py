"""Device mesh, data-parallel sharding and multi-host start-up.

Parameters and method state are replicated; the batch is split along its first axis over
every device of every host. Each host reads only its own slice of a global batch
(``jax.process_index()``/``jax.process_count()``) and ``make_array_from_process_local_data``
stitches the slices into one global array, so the same code runs on 1 CPU, 8 GPUs or a
TPU slice.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping, Optional, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
HOST_DEVICE_COUNT = "xla_force_host_platform_device_count"

log = logging.getLogger(__name__)


def user_cpu_device_count() -> Optional[Tuple[int, str]]:
    """The CPU device count the user set, and where; None when unset."""
    if jax.config.jax_num_cpu_devices >= 0:  # (JAX_NUM_CPU_DEVICES sets it at import)
        return jax.config.jax_num_cpu_devices, "jax_num_cpu_devices"
    found = re.search(rf"--{HOST_DEVICE_COUNT}=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return (int(found.group(1)), "XLA_FLAGS") if found else None


def split_host(count: int) -> None:
    """Before JAX starts its backends: its CPU backend presents the host as ``count``
    devices (0: leave JAX's setting, one device by default). Why: XLA:CPU runs one program
    on one device with intra-op threads, which kept 1.7 of 2 cores busy in a ViT-Demo step;
    one batch shard per core keeps both busy (README "Speed"). A count the user gave
    (``XLA_FLAGS``' --xla_force_host_platform_device_count, ``JAX_NUM_CPU_DEVICES`` or
    ``jax.config``'s ``jax_num_cpu_devices``) wins; a process that had already started JAX
    keeps its devices. Either is said in a warning, not silently ignored."""
    if not count:
        return
    user = user_cpu_device_count()
    if user is not None:
        if user[0] != count:
            log.warning("host_devices=%d not applied: %s sets %d CPU device(s)", count,
                        user[1], user[0])
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # JAX's backends are up: the count can no longer change
        log.warning("host_devices=%d not applied: JAX had started before this run, with %d "
                    "%s device(s) (in a notebook: jax.config.update('jax_num_cpu_devices', "
                    "%d) right after `import jax`)", count, jax.local_device_count(),
                    jax.default_backend(), count)


def initialise_distributed(**settings) -> None:
    """``jax.distributed.initialize(**settings)`` (before any other JAX call of a
    multi-process job), unless it already ran -- a launcher script may have called it. With
    no settings JAX reads the cluster environment (TPU VMs, SLURM, Open MPI)."""
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(**settings)


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
    """A 1-D mesh over all (or the first ``num_devices``) devices."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices}, but {len(devices)} devices are "
                             f"available; set --config.num_devices between 1 and "
                             f"{len(devices)} (or leave it unset for all of them)")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str = "batch size") -> None:
    """``global_batch_size`` splits evenly over the mesh's devices and hosts; ``field``
    names the config field in the error (e.g. ``'eval.batch_size'``)."""
    devices = mesh.devices.size
    where = f" (--config.{field})" if "." in field else ""
    if global_batch_size % devices:
        raise ValueError(f"{field} {global_batch_size} is not divisible by the {devices} "
                         f"devices of the mesh; choose a multiple of {devices}{where}")
    if global_batch_size % jax.process_count():
        raise ValueError(f"{field} {global_batch_size} is not divisible by the "
                         f"{jax.process_count()} hosts{where}")


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
    """This host's slice of a global batch -> global arrays sharded along the batch axis."""
    sharding = batch_sharded(mesh)
    # leaves may nest (a text batch's inputs are a dict of token arrays)
    return jax.tree_util.tree_map(
        lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)),
        dict(local_batch))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree on every device of the mesh (fully replicated)."""
    return jax.device_put(tree, replicated(mesh))


def to_host(tree: Any) -> Any:
    """Fetches a (replicated or sharded) pytree as numpy arrays."""
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)
