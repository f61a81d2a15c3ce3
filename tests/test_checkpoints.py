"""Checkpointer: resharding restore onto another mesh, retention, atomic steps, JSON extra, errors."""

from __future__ import annotations

import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from research.errors import CheckpointError
from research.train.checkpoints import Checkpointer


@flax.struct.dataclass
class TrainState:
  step: int
  params: Any
  frozen: Any  # {} when everything trains: an empty subtree must round-trip too
  opt_state: Any
  rng: jax.Array


def _mesh(shape: tuple[int, int]) -> Mesh:
  return Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "model"))


def _state(mesh: Mesh) -> TrainState:
  params = {
      "embed": jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16) / 7.0,
      "proj": jax.random.normal(jax.random.key(1), (16, 4), jnp.float32),
  }
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  # One real update so the moments and count are not trivially zero.
  updates, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
  state = TrainState(step=5, params=params, frozen={}, opt_state=opt_state,
                     rng=jax.random.key_data(jax.random.key(42)))

  def place(x: Any) -> Any:
    if not isinstance(x, jax.Array):
      return x
    spec = P("data") if x.ndim >= 1 and x.shape[0] % 8 == 0 else P()
    return jax.device_put(x, NamedSharding(mesh, spec))

  return jax.block_until_ready(jax.tree.map(place, state))


def _abstract(state: TrainState, mesh: Mesh) -> TrainState:
  """Targets on `mesh`, with partition specs unlike the ones the state was saved with."""

  def spec(x: jax.Array) -> P:
    if x.ndim == 2:
      return P("data", "model") if x.shape[1] % 4 == 0 and x.shape[0] % 2 == 0 else P()
    return P()

  def target(x: Any) -> Any:
    if not isinstance(x, jax.Array):
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec(x)))

  return jax.tree.map(target, state)


def test_restore_onto_other_mesh_is_exact_and_resharded(tmp_path: Any) -> None:
  saved = _state(_mesh((8, 1)))
  extra = {"data": {"shard": 3, "offset": 1234}, "config": {"lr": 3e-4, "name": "tiny"}}
  with Checkpointer(str(tmp_path / "ckpt"), max_to_keep=3) as ckpt:
    assert ckpt.save(5, saved, extra)
    ckpt.wait()

  abstract = _abstract(saved, _mesh((2, 4)))
  with Checkpointer(str(tmp_path / "ckpt"), max_to_keep=3) as ckpt:
    restored, restored_extra = ckpt.restore(None, abstract)

  assert restored_extra == extra
  assert isinstance(restored, TrainState) and restored.step == 5
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(saved)
  leaves = jax.tree_util.tree_flatten_with_path(saved)[0]
  for (path, old), new, want in zip(leaves, jax.tree.leaves(restored), jax.tree.leaves(abstract)):
    name = jax.tree_util.keystr(path)
    if isinstance(old, jax.Array):
      assert isinstance(new, jax.Array) and new.dtype == old.dtype, name
      np.testing.assert_array_equal(np.asarray(new), np.asarray(old), err_msg=name)
      assert new.sharding == want.sharding, name
    else:
      assert new == old and type(new) is type(old), name
  # The 2-D params really are split over both axes of the new mesh.
  assert restored.params["embed"].sharding.spec == P("data", "model")
  assert restored.params["embed"].addressable_shards[0].data.shape == (4, 4)


def test_retention_latest_and_extra(tmp_path: Any) -> None:
  state = {"w": jnp.arange(6, dtype=jnp.float32), "step": 0}
  directory = str(tmp_path / "ckpt")
  with Checkpointer(directory, max_to_keep=2, async_save=False) as ckpt:
    for step in (1, 2, 3):
      assert ckpt.save(step, {**state, "step": step}, {"step": step, "items": [step, "x", None]})
    assert ckpt.all_steps() == [2, 3]
    assert ckpt.latest_step() == 3
  assert sorted(os.listdir(directory)) == ["2", "3"]

  with Checkpointer(directory, max_to_keep=2) as ckpt:
    assert ckpt.restore_extra() == {"step": 3, "items": [3, "x", None]}
    assert ckpt.restore_extra(2) == {"step": 2, "items": [2, "x", None]}
    abstract = {"w": jax.ShapeDtypeStruct((6,), jnp.float32,
                                          sharding=NamedSharding(_mesh((8, 1)), P())),
                "step": 0}
    restored, _ = ckpt.restore(2, abstract)
    assert restored["step"] == 2
    with pytest.raises(CheckpointError, match=r"step 1 not found.*\[2, 3\]"):
      ckpt.restore(1, abstract)


def test_unfinished_tmp_dir_is_ignored(tmp_path: Any) -> None:
  directory = tmp_path / "ckpt"
  with Checkpointer(str(directory), max_to_keep=3, async_save=False) as ckpt:
    ckpt.save(3, {"w": np.ones(3, np.float32)}, {"ok": True})
  # What a crash during the save of step 7 leaves behind.
  (directory / "7.orbax-checkpoint-tmp-1700000000123").mkdir()
  (directory / "7.orbax-checkpoint-tmp-1700000000123" / "state").mkdir()
  with Checkpointer(str(directory), max_to_keep=3) as ckpt:
    assert ckpt.latest_step() == 3
    assert ckpt.all_steps() == [3]
    assert ckpt.restore_extra() == {"ok": True}


def test_empty_directory_raises_checkpoint_error(tmp_path: Any) -> None:
  directory = str(tmp_path / "nothing_here")
  with Checkpointer(directory, max_to_keep=1) as ckpt:
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    with pytest.raises(CheckpointError, match="nothing_here"):
      ckpt.restore(None, {"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
    with pytest.raises(CheckpointError, match="no checkpoint found in .*nothing_here"):
      ckpt.restore_extra()


def test_async_save_wait_restore(tmp_path: Any) -> None:
  mesh = _mesh((8, 1))
  sharding = NamedSharding(mesh, P("data"))
  w = jax.device_put(jnp.linspace(0.0, 1.0, 64, dtype=jnp.float32).reshape(16, 4), sharding)
  expected = np.asarray(w)
  with Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2, async_save=True) as ckpt:
    assert ckpt.save(10, {"w": w}, {"pos": 10})
    # Train steps donate the state: reusing its buffers once save() returns must be safe. Whether
    # XLA may reuse them at once depends on orbax's background thread having let go of its host
    # view (on CPU the "copy" can share the buffer; JAX then declines the donation and copies):
    # what must hold either way is that the checkpoint has the values as they were at save().
    w = jax.block_until_ready(jax.jit(lambda x: x + 1.0, donate_argnums=0)(w))
    np.testing.assert_array_equal(np.asarray(w), expected + 1.0)
    ckpt.wait()
    assert ckpt.latest_step() == 10
    target = {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=sharding)}
    restored, extra = ckpt.restore(10, target)
  np.testing.assert_array_equal(np.asarray(restored["w"]), expected)
  assert restored["w"].sharding == sharding
  assert extra == {"pos": 10}


def test_save_interval_and_mismatch_errors(tmp_path: Any) -> None:
  directory = str(tmp_path / "ckpt")
  with Checkpointer(directory, max_to_keep=5, save_interval_steps=10, async_save=False) as ckpt:
    assert ckpt.save(0, {"w": np.zeros(4, np.float32)}, {})
    assert not ckpt.save(5, {"w": np.zeros(4, np.float32)}, {})
    assert ckpt.save(7, {"w": np.zeros(4, np.float32)}, {}, force=True)
    assert ckpt.all_steps() == [0, 7]
    with pytest.raises(TypeError, match="not plain JSON"):
      ckpt.save(20, {"w": np.zeros(4, np.float32)}, {"bad": object()})
    sharding = NamedSharding(_mesh((8, 1)), P())
    with pytest.raises(CheckpointError, match="does not match"):
      ckpt.restore(7, {"w": jax.ShapeDtypeStruct((5,), jnp.float32, sharding=sharding)})
    with pytest.raises(CheckpointError, match="does not match"):
      ckpt.restore(7, {"v": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding)})
