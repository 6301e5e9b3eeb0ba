"""Device mesh, array placement and rule-based (FSDP) parameter sharding.

The mesh axes come from `config.mesh`, a list of (axis_name, size) pairs in the
big_vision style, where one size may be -1 ("all remaining devices"), e.g.
`[("data", -1), ("fsdp", 4)]`. The global batch is split over every mesh axis
in `BATCH_AXES` (data *and* fsdp: FSDP is data parallelism whose parameters
are sharded too). Axis types are `Auto` on purpose: with jax 0.10's default
(Explicit) axes, the global-batch `zimg @ ztxt.T` of the contrastive loss
raises a sharding type error, while `Auto` lets GSPMD insert the all-gather
(and its exact transpose in the backward pass), and likewise the all-gathers
of FSDP-sharded parameters.

Parameters are placed by rules, never by edits to the models:
`config.sharding_rules` is an ordered list of `(regex, rule)`; the first regex
that `re.fullmatch`es a parameter's path (`"text_model/layers/0/mlp/fc1/kernel"`)
decides, and parameters no rule matches get `"fsdp"`. A rule is

* `"fsdp"`: shard the largest dimension divisible by the fsdp axis size over
  `fsdp`, if the tensor has at least `config.fsdp_min_size` elements; else
  replicate (big_vision's `fsdp` strategy; ties go to the last dimension as
  there);
* `"replicate"`;
* a PartitionSpec-like tuple, one entry per leading dimension: `None`, an axis
  name, or a tuple of axis names, e.g. `(None, "fsdp")`.

Optimizer moments take the sharding of the parameter they mirror (same path
suffix and shape), so Adam's state is sharded exactly like the weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
import re
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

# Mesh axes the global batch is split over, in this order.
BATCH_AXES = ("data", "fsdp")
# The mesh axis that `"fsdp"` rules shard parameters over.
FSDP_AXIS = "fsdp"
DEFAULT_RULE = "fsdp"
NAMED_RULES = ("fsdp", "replicate")
DEFAULT_FSDP_MIN_SIZE = 2**14  # Elements: every weight matrix of a real CLIP, no bias or norm vector.

Rule = str | tuple


def mesh_shape(spec: Sequence[tuple[str, int]], num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Resolves a big_vision-style mesh spec (one size may be -1) against a device count."""
  names = tuple(name for name, _ in spec)
  sizes = [int(size) for _, size in spec]
  if len(set(names)) != len(names):
    raise ValueError(f"config.mesh={list(spec)} repeats an axis name; give each axis once.")
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh={list(spec)}: at most one axis may have size -1.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh={list(spec)}: axis sizes must be positive or -1.")
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


# ----------------------------------------------------------------------------
# Parameter sharding rules.


def path_str(path: Sequence[Any]) -> str:
  """`('text_model', 'layers', 0, 'mlp')` or jax key paths -> `'text_model/layers/0/mlp'`."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey.
      if hasattr(key, attr):
        key = getattr(key, attr)
        break
    parts.append(str(key))
  return "/".join(parts)


def _normalize_spec(spec: Sequence[Any], where: str) -> tuple:
  entries = []
  for entry in spec:
    if entry is None or isinstance(entry, str):
      entries.append(entry)
    elif isinstance(entry, (tuple, list)) and all(isinstance(a, str) for a in entry):
      entries.append(tuple(entry))
    else:
      raise ValueError(
          f"{where}: spec entry {entry!r} is not None, an axis name or a tuple of axis names. "
          "Fix: write specs like (None, 'fsdp')."
      )
  return tuple(entries)


def normalize_rules(rules: Sequence[Sequence[Any]] | None) -> list[tuple[re.Pattern, Rule]]:
  """Checks `config.sharding_rules` and compiles the regexes.

  Accepts the lists that a config reloaded from JSON holds in place of tuples.
  """
  out = []
  for i, item in enumerate(rules or ()):
    where = f"config.sharding_rules[{i}]={item!r}"
    if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str):
      raise ValueError(f"{where} is not a (regex, rule) pair. Fix: e.g. ('.*token_embedding', 'replicate').")
    pattern, rule = item
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{where}: bad regex ({e}). Fix the pattern.") from None
    if isinstance(rule, str):
      if rule not in NAMED_RULES:
        raise ValueError(f"{where}: unknown rule {rule!r}. Fix: use one of {NAMED_RULES} or a spec tuple.")
    elif isinstance(rule, (tuple, list)):
      rule = _normalize_spec(rule, where)
    else:
      raise ValueError(f"{where}: rule {rule!r} is neither {NAMED_RULES} nor a spec tuple.")
    out.append((regex, rule))
  return out


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
  """The default rule: the largest dimension divisible by `fsdp_size` goes over `fsdp`.

  Replicated if the mesh has no real fsdp axis, if the tensor is smaller than
  `min_size` elements, or if no dimension divides.
  """
  if fsdp_size <= 1 or math.prod(shape) < max(min_size, 1):
    return P()
  # Largest first; among equal sizes the last dimension first (big_vision's argsort()[::-1]).
  for dim in sorted(range(len(shape)), key=lambda d: (shape[d], d), reverse=True):
    if shape[dim] % fsdp_size == 0:
      return P(*([None] * dim + [FSDP_AXIS]))
  return P()


def _explicit_spec(spec: tuple, shape: Sequence[int], axis_sizes: Mapping[str, int], name: str) -> P:
  if len(spec) > len(shape):
    raise ValueError(
        f"sharding rule {spec} for {name!r} has {len(spec)} entries but the parameter has shape "
        f"{tuple(shape)}. Fix: give at most one entry per dimension."
    )
  for dim, entry in enumerate(spec):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
    for axis in axes:
      if axis not in axis_sizes:
        raise ValueError(
            f"sharding rule {spec} for {name!r} names mesh axis {axis!r}, but the mesh has "
            f"{tuple(axis_sizes)}. Fix: add the axis to config.mesh or change the rule."
        )
    size = math.prod(axis_sizes[a] for a in axes)
    if shape[dim] % size:
      raise ValueError(
          f"sharding rule {spec} for {name!r}: dimension {dim} of shape {tuple(shape)} is not "
          f"divisible by {size} devices of {axes}. Fix: change the rule or the mesh."
      )
  return P(*spec)


def param_spec(
    name: str,
    shape: Sequence[int],
    rules: Sequence[tuple[re.Pattern, Rule]],
    axis_sizes: Mapping[str, int],
    min_size: int,
) -> P:
  """The PartitionSpec of one parameter under the (normalised) rules."""
  rule: Rule = DEFAULT_RULE
  for regex, candidate in rules:
    if regex.fullmatch(name):
      rule = candidate
      break
  if rule == "replicate":
    return P()
  if rule == "fsdp":
    return fsdp_spec(shape, axis_sizes.get(FSDP_AXIS, 1), min_size)
  return _explicit_spec(rule, shape, axis_sizes, name)


def param_specs(
    params: Any, mesh: Mesh, rules: Sequence[Sequence[Any]] | None = None, min_size: int = DEFAULT_FSDP_MIN_SIZE
) -> Any:
  """A tree of PartitionSpecs for `params` (arrays or ShapeDtypeStructs)."""
  compiled = normalize_rules(rules)
  axis_sizes = dict(mesh.shape)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: param_spec(path_str(path), x.shape, compiled, axis_sizes, min_size), params
  )


def param_shardings(
    params: Any, mesh: Mesh, rules: Sequence[Sequence[Any]] | None = None, min_size: int = DEFAULT_FSDP_MIN_SIZE
) -> Any:
  return jax.tree.map(
      lambda spec: NamedSharding(mesh, spec),
      param_specs(params, mesh, rules, min_size),
      is_leaf=lambda x: isinstance(x, P),
  )


def mirror_param_shardings(tree: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree (optimizer state) whose leaves may mirror parameters.

  A leaf whose key path ends with a parameter's path and has that parameter's
  shape (Adam's `mu`/`nu`, a gradient accumulator) gets its sharding; every
  other leaf (step counts, empty masked states) is replicated.
  """
  by_path = {}
  for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(shardings)):
    by_path[tuple(path_str([k]) for k in path)] = (tuple(x.shape), s)
  depth = max((len(k) for k in by_path), default=0)
  rep = replicated(mesh)

  def pick(path, x):
    keys = tuple(path_str([k]) for k in path)
    for n in range(min(depth, len(keys)), 0, -1):
      hit = by_path.get(keys[-n:])
      if hit is not None and hit[0] == tuple(np.shape(x)):
        return hit[1]
    return rep

  return jax.tree_util.tree_map_with_path(pick, tree)


def describe(specs: Any) -> str:
  """One line per sharded parameter, for logs: `path: PartitionSpec(...)`."""
  lines = [
      f"{path_str(path)}: {spec}"
      for path, spec in jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
      if spec != P()
  ]
  return "\n".join(lines) if lines else "(all parameters replicated)"
