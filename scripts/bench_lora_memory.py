"""Train-state memory of full fine-tuning vs LoRA for one model, from abstract shapes (no arrays).

  python -m scripts.bench_lora_memory [--hidden 512] [--layers 8] [--vocab 32000] [--r 8]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import jax

from configs import common
from research.models.config import ModelConfig
from research.models.peft import LORA_TARGETS, PeftConfig
from research.parallel.mesh import make_mesh
from research.stages.lm import decoder_init
from research.train.optimizer import make_optimizer
from research.train.state import abstract_state


def tree_bytes(tree: Any) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def tree_count(tree: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def measure(cfg: ModelConfig, peft: PeftConfig) -> dict[str, int]:
  """Bytes (and element counts) of every part of the train state, from shapes alone."""
  tx, _ = make_optimizer(common.optimizer_config(), total_steps=1000)
  state, _ = abstract_state(decoder_init(cfg, peft), tx, make_mesh({"data": -1}))
  return {"params": tree_bytes(state.params) + tree_bytes(state.frozen),
          "trainable": tree_bytes(state.params), "frozen": tree_bytes(state.frozen),
          "opt_state": tree_bytes(state.opt_state),
          "trainable_count": tree_count(state.params),
          "total_count": tree_count(state.params) + tree_count(state.frozen)}


def _mib(n: int) -> str:
  return f"{n / 2**20:10.2f} MiB"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="scripts.bench_lora_memory",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv-heads", type=int, default=8)
  parser.add_argument("--mlp", type=int, default=1376)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--r", type=int, default=8)
  parser.add_argument("--param-dtype", default="float32")
  args = parser.parse_args(argv)
  cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                    num_heads=args.heads, num_kv_heads=args.kv_heads, mlp_dim=args.mlp,
                    param_dtype=args.param_dtype)
  lora = PeftConfig(method="lora", r=args.r, alpha=2.0 * args.r, targets=LORA_TARGETS)
  full, low = measure(cfg, PeftConfig()), measure(cfg, lora)
  print(f"model: hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads "
        f"({cfg.num_kv_heads} kv), mlp {cfg.mlp_dim}, vocab {cfg.vocab_size}, "
        f"{cfg.param_dtype} params; AdamW (configs/common.py optimizer)")
  print(f"LoRA: r={lora.r} on {', '.join(lora.targets)}")
  print(f"{'':18s}{'full FT':>14s}{'LoRA':>14s}{'LoRA / full':>13s}")
  for key, label in (("params", "params (all)"), ("trainable", "trainable params"),
                     ("opt_state", "optimizer state")):
    print(f"{label:18s}{_mib(full[key])}{_mib(low[key])}{low[key] / full[key]:13.4f}")
  grads_and_opt = lambda m: m["trainable"] + m["opt_state"]  # noqa: E731  (grads: trainable-sized)
  total = lambda m: m["params"] + grads_and_opt(m)  # noqa: E731
  print(f"{'params+grads+opt':18s}{_mib(total(full))}{_mib(total(low))}"
        f"{total(low) / total(full):13.4f}")
  print(f"trainable: {low['trainable_count']:,} of {low['total_count']:,} elements "
        f"({100 * low['trainable_count'] / low['total_count']:.3f}%) with LoRA; optimizer state "
        f"{full['opt_state'] / low['opt_state']:.1f}x smaller")
  return 0


if __name__ == "__main__":
  sys.exit(main())
