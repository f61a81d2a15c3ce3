"""Activation sharding: the decoder names its activations' logical axes, and inside
`activation_sharding(mesh, rules)` each is pinned to the sharding the rules give it.

Without these constraints XLA picks activation shardings by propagation alone, and under FSDP it
gathers the weights' `embed` axis into the activations instead: every device then holds the whole
global batch's activations and logits. The jitted steps (`research.train.step`) enter the context
while they trace; outside it (sampling, a bare `Decoder.apply`) `constrain` returns its input.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

from research.parallel.rules import Rules, batch_shard_count, logical_to_spec

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "activation_sharding", default=None)

# Logical axes of the decoder's activations. The feature axis of the residual stream stays whole
# (None): it is the axis every weight contracts, and `embed` shards weights, not activations.
RESIDUAL = ("batch", "length", None)
LOGITS = ("batch", "length", "vocab")
MLP_HIDDEN = ("batch", "length", "mlp")
QUERY_HEADS = ("batch", "length", "heads", None)
KV_HEADS = ("batch", "length", "kv_heads", None)
# Weights read whole along `embed` where they meet batch-sharded activations outside a matmul.
WHOLE_VECTOR = (None,)
EMBED_TABLE = ("vocab", None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Within this block (while a step is traced), `constrain` pins activations on `mesh`."""
  token = _ACTIVE.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active() -> tuple[Mesh, Rules] | None:
  """The (mesh, rules) a step is being traced under, or None (outside a step, or one device)."""
  current = _ACTIVE.get()
  return None if current is None or current[0].size == 1 else current


def batch_shards() -> int:
  """How many shards the active rules split the batch into (1 outside a step)."""
  active = _ACTIVE.get()
  return 1 if active is None else batch_shard_count(*active)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`x` with a sharding constraint from the active rules; unchanged outside a step or on one
  device. A mesh axis that does not divide a dimension is dropped (see `logical_to_spec`)."""
  active = _ACTIVE.get()
  if active is None or active[0].size == 1:
    return x
  mesh, rules = active
  if len(logical_axes) != x.ndim:
    raise ValueError(f"constrain: {len(logical_axes)} logical axes {tuple(logical_axes)} for an "
                     f"array of shape {x.shape}")
  spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
