"""One process of tests/test_multihost.py: the pretraining train step under jax.distributed (CPU,
gloo collectives on localhost), feeding only this process's rows of each global batch.

  python tests/multihost_worker.py --process_id=I --num_processes=2 --port=P --local_devices=2 \
      --steps=3 --out=RESULT.json

The model, optimizer and batches match tests/test_train_step.py; `run_steps` is also what the test
calls in its own process for the single-process reference.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable

import numpy as np

# data spans the processes (gradients all-reduced between them), fsdp each process's 2 devices.
# (fsdp or tensor across processes pass too; this mesh compiles fastest on a busy 2-core host.)
MESH = {"data": 2, "fsdp": 2, "tensor": 1}
GLOBAL_ROWS, SEQ = 8, 16
NO_GLOO, NO_GLOO_EXIT = "gloo CPU collectives unavailable", 3  # the test skips on this exit code


def global_batches(steps: int, vocab: int = 64) -> list[dict[str, np.ndarray]]:
  """The same global batches in every process (seeded), packed and padded rows included."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(steps):
    tokens = rng.integers(0, vocab, size=(GLOBAL_ROWS, SEQ + 1)).astype(np.int32)
    seg = np.ones((GLOBAL_ROWS, SEQ), np.int32)
    seg[1, 10:] = 2
    seg[2, 12:] = 0
    positions = np.broadcast_to(np.arange(SEQ), (GLOBAL_ROWS, SEQ)).copy()
    positions[1, 10:] = np.arange(SEQ - 10)
    mask = (seg != 0).astype(np.float32)
    out.append(dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg,
                    positions=positions, loss_mask=mask))
  return out


def run_steps(mesh, steps: int, feed: Callable[[dict, object], dict]) -> dict[str, list[float]]:
  """Losses and gradient norms of `steps` train steps on `mesh`;
  `feed(host_batch, sharding)` turns a global host batch into the step's global device batch."""
  from ml_collections import ConfigDict  # pylint: disable=import-outside-toplevel

  from research.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from research.parallel.rules import batch_sharding  # pylint: disable=import-outside-toplevel
  from research.stages.lm import decoder_init, lm_loss_fn  # pylint: disable=import-outside-toplevel
  from research.train.optimizer import make_optimizer  # pylint: disable=import-outside-toplevel
  from research.train.state import (  # pylint: disable=import-outside-toplevel
      abstract_state, init_state)
  from research.train.step import (  # pylint: disable=import-outside-toplevel
      jit_train_step, make_train_step)

  cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64)
  opt = ConfigDict(dict(lr=3e-3, warmup_steps=1, schedule="cosine", min_lr_ratio=0.1, b1=0.9,
                        b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0))
  tx, schedule = make_optimizer(opt, total_steps=10)
  init_fn = decoder_init(cfg)
  _, shardings = abstract_state(init_fn, tx, mesh)
  state = init_state(init_fn, tx, shardings, seed=0)
  sharding = batch_sharding(mesh)
  step = jit_train_step(make_train_step(lm_loss_fn(cfg), tx, schedule), shardings, sharding)
  losses, grad_norms = [], []
  for host_batch in global_batches(steps, cfg.vocab_size):
    state, metrics = step(state, feed(host_batch, sharding))
    losses.append(float(metrics["loss"]))  # blocks: one step in flight
    grad_norms.append(float(metrics["grad_norm"]))
  return {"losses": losses, "grad_norms": grad_norms}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--process_id", type=int, required=True)
  p.add_argument("--num_processes", type=int, default=2)
  p.add_argument("--port", type=int, required=True)
  p.add_argument("--local_devices", type=int, default=2)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--out", required=True)
  args = p.parse_args()
  start = time.perf_counter()

  def say(what: str) -> None:  # progress in the log the test prints on failure
    print(f"[process {args.process_id}] {what} at {time.perf_counter() - start:.1f} s", flush=True)
  # Before jax starts: this process's own host devices.
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_default_matmul_precision", "highest")

  from research.parallel.distributed import (  # pylint: disable=import-outside-toplevel
      global_batch_from_local, maybe_initialize)
  from research.parallel.mesh import make_mesh  # pylint: disable=import-outside-toplevel

  try:
    maybe_initialize(f"localhost:{args.port}", args.num_processes, args.process_id)
  except Exception as e:  # pylint: disable=broad-except
    if "gloo" in str(e).lower() or "collectives" in str(e).lower():
      print(f"{NO_GLOO}: {e}", flush=True)
      raise SystemExit(NO_GLOO_EXIT) from e
    raise
  assert jax.process_count() == args.num_processes
  assert jax.device_count() == args.num_processes * args.local_devices

  def feed(batch, sharding):  # this process's contiguous rows, as the stages' loader gives them
    rows = GLOBAL_ROWS // jax.process_count()
    lo = jax.process_index() * rows
    return global_batch_from_local({k: v[lo:lo + rows] for k, v in batch.items()}, sharding)

  say("initialized")
  result = run_steps(make_mesh(MESH), args.steps, feed)
  result.update(process=jax.process_index(), devices=jax.device_count(),
                local_devices=jax.local_device_count())
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f)
  say("done")
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
