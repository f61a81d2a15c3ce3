"""The device mesh from config: axes `data`, `fsdp`, `tensor`; a size of -1 fills the remaining devices."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from research.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Fills one -1 axis with the devices left over; checks that the product is `num_devices`."""
  shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
  wildcards = [i for i, s in enumerate(shape) if s == -1]
  if len(wildcards) > 1:
    raise ConfigError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
  if any(s == 0 or s < -1 for s in shape):
    raise ConfigError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
  if wildcards:
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
      raise ConfigError(
          f"mesh {dict(zip(MESH_AXES, shape))}: the fixed axes ({known} devices) do not divide the "
          f"{num_devices} available devices; change --config.mesh.*")
    shape[wildcards[0]] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ConfigError(
        f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but "
        f"{num_devices} are available; set --config.mesh.data/fsdp/tensor so that their product is "
        f"{num_devices} (or use -1 on one axis to fill)")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(sizes, len(devices))
  try:
    from jax.experimental import mesh_utils
    device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except Exception:  # pylint: disable=broad-except  # topology helpers are optional on CPU
    device_array = np.asarray(devices).reshape(shape)
  # Auto axes: shardings are propagated by the compiler from the in/out shardings we give.
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
