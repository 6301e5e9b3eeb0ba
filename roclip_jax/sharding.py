"""Device mesh and array placement.

The mesh axes come from `config.mesh`, a list of (axis_name, size) pairs in the
big_vision style, where one size may be -1 ("all remaining devices"). The batch
is split over every mesh axis listed in `BATCH_AXES`; parameters are replicated
for now. Axis types are `Auto` on purpose: with jax 0.10's default (Explicit)
axes, the global-batch `zimg @ ztxt.T` of the contrastive loss raises a
sharding type error, while `Auto` lets GSPMD insert the all-gather (and its
exact transpose in the backward pass).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

# Mesh axes the global batch is split over, in this order.
BATCH_AXES = ("data",)


def mesh_shape(spec: Sequence[tuple[str, int]], num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Resolves a big_vision-style mesh spec (one size may be -1) against a device count."""
  names = tuple(name for name, _ in spec)
  sizes = [int(size) for _, size in spec]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh={list(spec)}: at most one axis may have size -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f"config.mesh={list(spec)}: {num_devices} devices are not divisible by the fixed axes' product {known}."
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"config.mesh={list(spec)} asks for {math.prod(sizes)} devices but {num_devices} are present; "
        "use -1 for one axis to take the rest."
    )
  if "data" not in names:
    raise ValueError(f"config.mesh={list(spec)} must contain a 'data' axis.")
  return names, tuple(sizes)


def make_mesh(spec: Sequence[tuple[str, int]], devices: Sequence[Any] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = mesh_shape(spec, len(devices))
  device_grid = np.asarray(devices).reshape(sizes)
  return Mesh(device_grid, names, axis_types=tuple(AxisType.Auto for _ in names))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's slice of the batch into one global, batch-sharded array.

  `make_array_from_process_local_data` (not `device_put`) because on several
  hosts every process holds a different slice of the global batch.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
