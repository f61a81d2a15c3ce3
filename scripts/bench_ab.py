"""In-process A/B of the train step: the working tree against an earlier commit, alternated in one
process (random order each round), at bench_train's sizes, with transformers' step beside them.

  python -m scripts.bench_ab --against=COMMIT [--sizes=S,M] [--rounds=20]

The earlier commit's `research/` is extracted with `git archive` into a temporary directory and
imported as `research_ab` (every `research.` import renamed), so both builds share the process,
its allocator and the host's minute-to-minute speed. Prints median step times, new/old speed and
the range of per-round ratios, and JAX/torch for both.
"""

from __future__ import annotations

import argparse
import io
import random
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

OLD = "research_ab"


def extract(commit: str, root: Path) -> None:
  """`research/` at `commit` as package `research_ab` under `root`."""
  tar = subprocess.run(["git", "archive", commit, "research"], check=True, capture_output=True,
                       cwd=Path(__file__).resolve().parents[1]).stdout
  with tarfile.open(fileobj=io.BytesIO(tar)) as t:
    t.extractall(root)  # noqa: S202 (our own repository's archive)
  (root / "research").rename(root / OLD)
  for path in (root / OLD).rglob("*.py"):
    text = re.sub(r"\bresearch\.", f"{OLD}.", path.read_text())
    path.write_text(re.sub(r"\bfrom research import", f"from {OLD} import", text))


def build(package: str, size):
  """One step of `package`'s code as every stage builds it, with a runner that blocks on it."""
  import jax
  from ml_collections import ConfigDict

  from scripts import bench_train as bt
  mod = lambda name: __import__(f"{package}.{name}", fromlist=["_"])  # noqa: E731
  config = mod("models.config")
  cfg = config.ModelConfig(vocab_size=size.vocab, hidden_size=size.hidden, num_layers=size.layers,
                           num_heads=size.heads, num_kv_heads=size.kv_heads, mlp_dim=size.mlp,
                           rms_norm_eps=1e-6, max_position_embeddings=size.seq,
                           layer_streams=2)  # as bench_train: what CPU runs use
  opt = ConfigDict(dict(lr=bt.LR, warmup_steps=0, schedule="constant", min_lr_ratio=1.0, b1=bt.B1,
                        b2=bt.B2, eps=bt.EPS, weight_decay=bt.WD, clip_norm=bt.CLIP))
  mesh = mod("parallel.mesh").make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  tx, schedule = mod("train.optimizer").make_optimizer(opt, total_steps=1_000_000)
  lm, state_mod, step_mod = mod("stages.lm"), mod("train.state"), mod("train.step")
  init_fn = lm.decoder_init(cfg)
  _, shardings = state_mod.abstract_state(init_fn, tx, mesh)
  batch_sharding = mod("parallel.rules").batch_sharding(mesh)
  step = step_mod.jit_train_step(step_mod.make_train_step(lm.lm_loss_fn(cfg), tx, schedule),
                                 shardings, batch_sharding)
  holder = {"state": state_mod.init_state(init_fn, tx, shardings, seed=0)}
  batch = {k: jax.device_put(v, batch_sharding) for k, v in bt.random_batch(size).items()}

  def run() -> float:
    holder["state"], metrics = step(holder["state"], batch)
    loss = float(metrics["loss"])
    jax.block_until_ready(holder["state"])
    return loss
  return run


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--against", required=True, help="the earlier commit (hash, tag, HEAD~3)")
  p.add_argument("--sizes", default="S")
  p.add_argument("--rounds", type=int, default=20)
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  from scripts import bench_train as bt
  with tempfile.TemporaryDirectory() as tmp:
    extract(args.against, Path(tmp))
    sys.path.insert(0, tmp)
    bt.torch_setup(2)
    for name in args.sizes.split(","):
      size = bt.SIZES[name]
      runs = {"old": build(OLD, size), "new": build("research", size),
              "torch": bt.TorchStep(size, "sdpa")}
      first = {k: run() for k, run in runs.items()}
      times: dict[str, list[float]] = {k: [] for k in runs}
      for i in range(args.rounds):
        order = list(runs.items())
        random.Random(i).shuffle(order)
        for k, run in order:
          t0 = time.perf_counter()
          run()
          times[k].append(time.perf_counter() - t0)
      med = {k: statistics.median(v) for k, v in times.items()}
      ratios = [o / n for o, n in zip(times["old"], times["new"])]
      print(f"{name}: first losses old {first['old']:.6f} new {first['new']:.6f}; median step old "
            f"{med['old'] * 1e3:.0f} ms, new {med['new'] * 1e3:.0f} ms, torch "
            f"{med['torch'] * 1e3:.0f} ms; new/old speed {med['old'] / med['new']:.3f}x (rounds "
            f"{min(ratios):.2f}-{max(ratios):.2f}); JAX/torch old {med['torch'] / med['old']:.2f}x, "
            f"new {med['torch'] / med['new']:.2f}x", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
