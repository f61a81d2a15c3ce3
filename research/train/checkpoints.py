"""Training checkpoints: a thin wrapper over orbax `CheckpointManager` that stores the train state
(sharded jax arrays, restorable onto a different mesh) next to a JSON `extra` item per step.

Guarantees (checked in tests/test_checkpoints.py):
  * Atomic steps: orbax writes `<dir>/<step>.orbax-checkpoint-tmp-<ts>` and renames it to `<dir>/<step>`
    only once every process has finished, so a crash mid-save never shows up in `latest_step()`.
  * Retention: only the newest `max_to_keep` finalized steps are kept.
  * Resharding: `restore` lays every array out with the sharding of the matching leaf in
    `abstract_state`, whatever mesh the checkpoint was written from.
  * Multi-process: every process calls `save`/`restore` with the same arguments; orbax writes each
    array shard from the process that owns it and the JSON item and metadata from process 0 only.
  * Verified restores: a step whose files do not restore (truncated, garbage) raises
    `UnrestorableCheckpoint` naming the step; with step=None `restore` and `restore_newest` fall
    back to the newest step that restores, saying which on stderr.
The step list is read when the `Checkpointer` is built and then tracks its own saves; build a new
one to see steps written by another job.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Any, Callable, TypeVar

import jax
import orbax.checkpoint as ocp

from research.errors import CheckpointError

PyTree = Any

_STATE = "state"
_EXTRA = "extra"
UNRESTORABLE_PREFIX = "unrestorable-"  # a step set aside: not a step name, so never listed
T = TypeVar("T")


class UnrestorableCheckpoint(CheckpointError):
  """A finalized step whose files fail to read (truncated, garbage); older steps may still do."""


def _first_line(error: BaseException) -> str:
  """The first line of the innermost cause: tensorstore's own (which file, which byte range)
  rather than orbax's wrapper around it, which holds a whole TensorStore spec."""
  seen = {id(error)}
  while (error.__cause__ or error.__context__) is not None and id(
      error.__cause__ or error.__context__) not in seen:
    error = error.__cause__ or error.__context__
    seen.add(id(error))
  text = str(error).split(" [tensorstore_spec")[0].strip().splitlines()
  line = text[0] if text else type(error).__name__
  return line if len(line) <= 200 else line[:197] + "..."


# Tensorstore's status codes for files it cannot read; a tree or shape mismatch is none of these.
_DAMAGE = re.compile(r"^(OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|FAILED_PRECONDITION|INTERNAL|UNKNOWN): "
                     r"|Error (reading|decoding) ")


def _is_damage(error: BaseException) -> bool:
  while error is not None:
    if _DAMAGE.search(str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


class _OrphanReadErrors(logging.Filter):
  """Orbax reads arrays as asyncio futures and leaves the others of a failed read unretrieved:
  each would log its whole TensorStore spec again when collected, after the one line we print."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Future exception was never retrieved")


_ORPHAN_MESSAGES = ("Encountered error while reading", "Event loop is closed")


def _drop_orphan_read_errors() -> None:
  """Silences what a failed orbax read leaves behind: unretrieved futures (logged by asyncio)
  and abandoned coroutines (reported through sys.unraisablehook), each a multi-line dump."""
  logger = logging.getLogger("asyncio")
  if any(isinstance(f, _OrphanReadErrors) for f in logger.filters):
    return
  logger.addFilter(_OrphanReadErrors())
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    text = str(unraisable.exc_value)
    if not any(message in text for message in _ORPHAN_MESSAGES):
      previous(unraisable)

  sys.unraisablehook = hook


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _absolute(directory: str | os.PathLike) -> str:
  # Remote paths (gs://...) are absolute already; local ones are made so because orbax resolves
  # relative paths against its own idea of the working directory on each process.
  directory = os.fspath(directory)
  return directory if "://" in directory else os.path.abspath(directory)


def _as_abstract(leaf: Any) -> Any:
  # A concrete jax.Array target (e.g. a freshly initialised state) is accepted too: its shape, dtype
  # and sharding are what the restored array should have.
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  return leaf


def _check_shardings(abstract_state: PyTree, directory: str) -> None:
  missing = [
      jax.tree_util.keystr(path)
      for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
      if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None
  ]
  if missing:
    # Without a target sharding orbax would reuse the mesh recorded at save time, which may name
    # devices this job does not have; better to say so here than fail deep inside tensorstore.
    raise ValueError(
        f"restore from {directory}: abstract_state leaves {missing[:5]}"
        f"{' ...' if len(missing) > 5 else ''} have no .sharding; build them with "
        "jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec)).")


class Checkpointer:
  """Saves and restores `(state, extra)` pairs under `directory/<step>/`."""

  def __init__(self,
               directory: str | os.PathLike,
               max_to_keep: int,
               save_interval_steps: int | None = None,
               async_save: bool = True) -> None:
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    self.directory = _absolute(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=save_interval_steps or 1,
        enable_async_checkpointing=async_save,
        # Stale tmp dirs are left alone: another job (e.g. an evaluator) may hold a manager on the
        # same directory, and cleaning at start-up could delete a save that is still in flight.
        cleanup_tmp_directories=False,
        create=True,
    )
    # Registering the handlers up front (rather than item_names) lets `restore_extra` read one item
    # without the other and keeps orbax from warning about items it "cannot restore".
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={
            _STATE: ocp.StandardCheckpointHandler(),
            _EXTRA: ocp.JsonCheckpointHandler(),
        },
    )

  # -- saving -------------------------------------------------------------------------------------

  def save(self, step: int, state: PyTree, extra: dict[str, Any], force: bool = False) -> bool:
    """Starts saving `state` and `extra` as `step`; returns False if `save_interval_steps` skips it.

    With `async_save` this returns once the arrays are copied to host memory, so the caller may
    donate or overwrite its device buffers right away; the write to disk finishes in the background
    (see `wait`). `force=True` saves even off the interval (e.g. the final step).
    """
    try:
      json.dumps(extra)
    except (TypeError, ValueError) as e:
      # Checked here because with async saves the JSON write fails later on a background thread.
      raise TypeError(f"checkpoint extra for step {step} in {self.directory} is not plain JSON "
                      f"(dicts with str keys, lists, str, int, float, bool, None): {e}") from e
    return self._manager.save(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state),
            _EXTRA: ocp.args.JsonSave(extra),
        }),
        force=force,
    )

  def wait(self) -> None:
    """Blocks until every pending asynchronous save is finalized on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's background threads."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  # -- listing ------------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest finalized step, or None when there is none (unfinished tmp dirs never count)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Finalized steps, ascending."""
    return sorted(self._manager.all_steps())

  # -- restoring ----------------------------------------------------------------------------------

  def _resolve_step(self, step: int | None) -> int:
    # A step still being written by this process is not restorable until it is finalized.
    self.wait()
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(
          f"no checkpoint found in {self.directory}: the directory is empty or holds only "
          "unfinished saves (*.orbax-checkpoint-tmp-*). Check the workdir, or start without "
          "resuming.")
    if step is None:
      return steps[-1]
    if step not in steps:
      raise CheckpointError(
          f"checkpoint step {step} not found in {self.directory}; available steps: {steps}. "
          "Pass one of these, or None for the latest.")
    return step

  def restore(self, step: int | None, abstract_state: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Restores `(state, extra)` from `step` (None = latest).

    `abstract_state` has the structure of the saved state, with `jax.ShapeDtypeStruct` leaves whose
    `.sharding` says where each restored array goes (any mesh; it need not match the saving one).
    Python scalars and numpy arrays in it come back as the same types. Dtypes are cast to the
    requested ones; shapes must match exactly.
    """
    if step is None:
      return self.restore_newest(lambda s: self.restore(s, abstract_state))[1]
    step = self._resolve_step(step)
    abstract_state = jax.tree.map(_as_abstract, abstract_state)
    _check_shardings(abstract_state, self.directory)
    try:
      restored = self._read(step, lambda: self._manager.restore(
          step,
          args=ocp.args.Composite(**{
              _STATE: ocp.args.StandardRestore(abstract_state),
              _EXTRA: ocp.args.JsonRestore(),
          }),
      ))
    except UnrestorableCheckpoint:
      raise
    except ValueError as e:
      # Tree-structure or shape mismatches: almost always a changed model/optimizer config.
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} does not match the state being restored into: {e}\n"
          "Resume with the same model and optimizer config as the run that wrote it (its config is "
          "in the checkpoint's extra), or point to a different checkpoint directory.") from e
    return restored[_STATE], restored[_EXTRA]

  def _read(self, step: int, read: Callable[[], T]) -> T:
    """`read()`, with a failure to read the step's files raised as UnrestorableCheckpoint.

    ValueError/KeyError pass through: orbax raises them when the saved tree does not match the
    requested one (a config change, not damage). Tensorstore raises a bare Exception for
    damaged data; a damaged JSON item is a JSONDecodeError.
    """
    try:
      return read()
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
      raise self._unrestorable(step, e) from e
    except (ValueError, KeyError) as e:
      if _is_damage(e):
        raise self._unrestorable(step, e) from e
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise self._unrestorable(step, e) from e

  def _unrestorable(self, step: int, error: BaseException) -> UnrestorableCheckpoint:
    _drop_orphan_read_errors()
    return UnrestorableCheckpoint(
        f"checkpoint step {step} in {self.directory} does not restore, its files are damaged "
        f"({_first_line(error)})")

  def restore_newest(self, read: Callable[[int], T], step: int | None = None) -> tuple[int, T]:
    """(step, read(step)) for `step`, or for None the newest step that `read` restores: a damaged
    step is named on stderr and the one before it tried. Raises when none restores."""
    if step is not None:
      return step, read(self._resolve_step(step))
    self.wait()
    steps = list(reversed(self.all_steps()))
    if not steps:
      self._resolve_step(None)  # raises: nothing to restore
    for i, candidate in enumerate(steps):
      try:
        result = read(candidate)
      except UnrestorableCheckpoint as e:
        if i + 1 == len(steps):
          raise CheckpointError(f"no checkpoint in {self.directory} restores (steps {steps}); "
                                f"the oldest: {e}") from e
        _warn(f"{e}; falling back to step {steps[i + 1]}")
        continue
      if i:
        _warn(f"restored step {candidate} of {self.directory}, the newest that restores")
      return candidate, result
    raise AssertionError("unreachable")

  def set_aside_newer(self, step: int) -> list[int]:
    """Renames the finalized steps after `step` to `unrestorable-<step>` (kept for inspection,
    never listed), so a run resumed from `step` saves its own steps there; returns them."""
    newer = [s for s in self.all_steps() if s > step]
    if newer and jax.process_index() == 0:
      for s in newer:
        os.replace(os.path.join(self.directory, str(s)),
                   os.path.join(self.directory, f"{UNRESTORABLE_PREFIX}{s}"))
    if newer:
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices("checkpoints set aside")
      self._manager.reload()
      _warn(f"set aside the damaged steps {newer} in {self.directory} as {UNRESTORABLE_PREFIX}*")
    return newer

  def restore_extra(self, step: int | None = None) -> dict[str, Any]:
    """Reads only the JSON item of `step` (None = latest), e.g. to rebuild the config first."""
    step = self._resolve_step(step)
    restored = self._read(step, lambda: self._manager.restore(
        step, args=ocp.args.Composite(**{_EXTRA: ocp.args.JsonRestore()})))
    return restored[_EXTRA]

  def restore_fields(self, step: int | None, abstract_fields: dict[str, PyTree]) -> dict[str, PyTree]:
    """Restores only some top-level fields of the saved state (e.g. `params` and `frozen`).

    Used to take weights out of a run without building its optimizer state: nothing else is read.
    Leaves of `abstract_fields` are `jax.ShapeDtypeStruct`s with `.sharding` set.
    """
    step = self._resolve_step(step)
    abstract_fields = jax.tree.map(_as_abstract, abstract_fields)
    _check_shardings(abstract_fields, self.directory)
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
        abstract_fields)
    path = os.path.join(self.directory, str(step), _STATE)
    try:
      return self._read(step, lambda: ocp.PyTreeCheckpointer().restore(
          path, args=ocp.args.PyTreeRestore(item=abstract_fields, restore_args=restore_args,
                                            partial_restore=True)))
    except UnrestorableCheckpoint:
      raise
    except (ValueError, KeyError) as e:
      raise CheckpointError(
          f"checkpoint {path} has no fields {sorted(abstract_fields)} of the expected shapes: {e}"
      ) from e
