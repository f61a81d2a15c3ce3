"""Multi-host start-up and per-process batch slices."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from research.errors import ConfigError


def maybe_initialize(coordinator_address: str, num_processes: int, process_id: int,
                     cpu_collectives: str = "gloo") -> bool:
  """Calls `jax.distributed.initialize` when a coordinator is given; True if it did."""
  if not coordinator_address:
    if num_processes not in (0, 1):
      raise ConfigError("--num_processes > 1 needs --coordinator_address=HOST:PORT")
    return False
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ConfigError(f"--process_id={process_id} must lie in [0, --num_processes={num_processes})")
  if jax.config.jax_platforms in (None, "", "cpu") and cpu_collectives:
    # CPU meshes across processes need a collectives backend (gloo works on localhost).
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def global_batch_from_local(local_batch: dict[str, np.ndarray],
                            sharding: NamedSharding) -> dict[str, Any]:
  """Each process passes only its own rows; the result is one global array per key."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def check_global_batch(global_batch: int, micro_batches: int, batch_shards: int) -> None:
  if global_batch % (micro_batches * batch_shards) or global_batch % jax.process_count():
    raise ConfigError(
        f"train.global_batch={global_batch} must be divisible by train.micro_batches="
        f"{micro_batches} x the {batch_shards} batch shards of the mesh (data*fsdp), and by the "
        f"{jax.process_count()} processes")
