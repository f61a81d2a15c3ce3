"""Multi-host start-up and per-process batch slices."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from research.errors import ConfigError


def detected_cluster() -> str | None:
  """The cluster environment `jax.distributed.initialize()` would detect by itself (SLURM, Open
  MPI, Cloud TPU VMs and GKE TPU pods, Kubernetes), or None. Opt-in methods (mpi4py) are not
  auto-detected, as in jax."""
  try:
    from jax._src import clusters  # pylint: disable=import-outside-toplevel
  except ImportError:  # jax moved its detection: fall back to explicit flags only
    return None
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if getattr(env, "opt_in_only_method", False):
      continue
    try:
      if env.is_env_present():
        return env.__name__
    except Exception:  # pylint: disable=broad-except
      continue  # a detector that cannot tell (a missing optional package) is not this cluster
  return None


def maybe_initialize(coordinator_address: str, num_processes: int, process_id: int,
                     cpu_collectives: str = "gloo", auto: bool = True) -> bool:
  """Calls `jax.distributed.initialize`: with the flags when a coordinator is given, else with no
  arguments when `auto` and jax can detect the cluster (a TPU pod, a SLURM job), so multi-host runs
  need no flags there. True if it did."""
  if not coordinator_address:
    if num_processes not in (0, 1):
      raise ConfigError("--num_processes > 1 needs --coordinator_address=HOST:PORT")
    cluster = detected_cluster() if auto else None
    if cluster is None:
      return False
    jax.distributed.initialize()
    if jax.process_index() == 0:
      print(f"jax.distributed: {cluster} detected, {jax.process_count()} process(es)", flush=True)
    return True
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
