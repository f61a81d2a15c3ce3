"""Logical-axis rules and the shardings they give a pytree on a mesh.

Every parameter names its axes (`vocab`, `embed`, `heads`, ...); the rules map each name to mesh axes.
A mesh axis that does not divide a dimension, or is already used by another dimension of the same
array, is dropped for that dimension (the dimension is replicated), so odd sizes still run.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, Any]]

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
    ("lora_rank", None),
    ("adapter", None),
    ("virtual_tokens", None),
)


def _as_tuple(axes: Any) -> tuple[str, ...]:
  if axes is None:
    return ()
  if isinstance(axes, str):
    return (axes,)
  return tuple(axes)


def logical_to_spec(logical_axes: Iterable[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules = DEFAULT_RULES) -> PartitionSpec:
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape):
    chosen = []
    for axis in _as_tuple(table.get(name)) if name is not None else ():
      size = mesh.shape[axis]
      if axis in used or size == 1:
        continue
      if dim % (math.prod(mesh.shape[a] for a in chosen) * size):
        continue
      chosen.append(axis)
    used.update(chosen)
    spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
  return PartitionSpec(*spec)


def logical_axes_of(boxed_tree: Any) -> Any:
  """Tree of logical-axis tuples (None for unannotated leaves) from a tree with `nn.Partitioned` boxes."""
  specs = nn.get_partition_spec(boxed_tree)
  return jax.tree.map(lambda s: tuple(s) if isinstance(s, PartitionSpec) else None, specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def shardings_for(abstract_tree: Any, logical_tree: Any, mesh: Mesh,
                  rules: Rules = DEFAULT_RULES) -> Any:
  """NamedSharding per leaf of `abstract_tree`, given a matching tree of logical axes (or None)."""

  def one(leaf, names):
    shape = getattr(leaf, "shape", ())
    if not names or len(names) != len(shape):
      return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))

  treedef = jax.tree.structure(abstract_tree)
  # The logical tree has tuples (or None) where the abstract tree has leaves.
  names = treedef.flatten_up_to(logical_tree)
  return treedef.unflatten([one(leaf, n) for leaf, n in zip(treedef.flatten_up_to(abstract_tree), names)])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Rows of a batch split over the mesh axes the `batch` rule names; other dims replicated."""
  axes = tuple(a for a in _as_tuple(dict(rules).get("batch")) if mesh.shape[a] > 1)
  return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def batch_shard_count(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
  return math.prod(mesh.shape[a] for a in _as_tuple(dict(rules).get("batch")))
