"""Train-step benchmark on one GPU: this codebase's jitted JAX step (bfloat16 compute, float32
master weights, AdamW, the attention `auto` picks) against transformers' `LlamaForCausalLM` on
torch with the same shapes and optimizer under bfloat16 autocast, with `sdpa`, `eager` and
`torch.compile` over sdpa, the steps alternated in one process.

  python -m scripts.bench_train_gpu [--sizes=smollm2,llama1b] [--steps=20] [--json=out.json]

Prints per size and implementation the median tokens/s, the ratio to JAX, MFU against the chip's
dense bf16 peak (the planner's datasheet table; a measured bf16 matmul rate beside it) and the
peak device memory of each framework. JAX preallocation is off so both frameworks share the GPU;
each framework's own allocator reports its peak. `--sizes=tiny` runs anywhere (a smoke test).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Size:
  name: str
  vocab: int
  hidden: int
  layers: int
  heads: int
  kv_heads: int
  mlp: int
  batch: int
  seq: int
  tie: bool
  rope_theta: float
  head_dim: int | None = None

  @property
  def tokens(self) -> int:
    return self.batch * self.seq


SIZES = {
    # SmolLM2-135M's shape (Llama architecture, tied embeddings).
    "smollm2": Size("smollm2", 49152, 576, 30, 9, 3, 1536, batch=8, seq=2048, tie=True,
                    rope_theta=1e5),
    # Llama-3.2-1B's shape.
    "llama1b": Size("llama1b", 128256, 2048, 16, 32, 8, 8192, batch=4, seq=2048, tie=True,
                    rope_theta=5e5, head_dim=64),
    "tiny": Size("tiny", 512, 64, 2, 4, 2, 128, batch=2, seq=128, tie=True, rope_theta=1e4),
}
LR, B1, B2, EPS, WD, CLIP = 3e-4, 0.9, 0.95, 1e-8, 0.1, 1.0
TORCH_IMPLS = ("sdpa", "eager", "compile")


def model_config(size: Size, remat: str):
  from research.models.config import ModelConfig
  return ModelConfig(vocab_size=size.vocab, hidden_size=size.hidden, num_layers=size.layers,
                     num_heads=size.heads, num_kv_heads=size.kv_heads, head_dim=size.head_dim,
                     mlp_dim=size.mlp, rope_theta=size.rope_theta, rms_norm_eps=1e-5,
                     tie_embeddings=size.tie, max_position_embeddings=size.seq,
                     dtype="bfloat16", param_dtype="float32", remat_policy=remat)


def flops_per_token(size: Size, remat: str) -> float:
  """6N + attention (the PaLM formula), N without the input embedding unless tied."""
  cfg = model_config(size, remat)
  n = cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size)
  return 6 * n + 12 * cfg.num_layers * size.seq * cfg.num_heads * cfg.resolved_head_dim


def random_batch(size: Size) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, size.vocab, size=(size.batch, size.seq + 1)).astype(np.int32)
  ones = np.ones((size.batch, size.seq), np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=ones,
              positions=np.broadcast_to(np.arange(size.seq, dtype=np.int32), ones.shape).copy(),
              loss_mask=ones.astype(np.float32))


class JaxStep:
  """The step as every stage builds it (research.train.builder), on one device."""

  def __init__(self, size: Size, remat: str):
    import jax
    from ml_collections import ConfigDict

    from research.parallel.mesh import make_mesh
    from research.stages.lm import decoder_init, lm_loss_fn
    from research.train.builder import build_step
    from research.train.state import init_state

    self.cfg = model_config(size, remat)
    opt = ConfigDict(dict(lr=LR, warmup_steps=0, schedule="constant", min_lr_ratio=1.0, b1=B1,
                          b2=B2, eps=EPS, weight_decay=WD, clip_norm=CLIP))
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    built = build_step(init_fn=decoder_init(self.cfg), optimizer=opt, total_steps=10 ** 6,
                       mesh=mesh, loss_fn=lm_loss_fn(self.cfg))
    self.state = init_state(built.init_fn, built.tx, built.shardings, seed=0)
    self.batch = {k: jax.device_put(v, built.batch_sharding) for k, v in random_batch(size).items()}
    self.step = built.train_step
    self.attention = getattr(self.cfg, "attention", "cpu_blocked")

  def __call__(self) -> float:
    import jax
    self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready(self.state)
    return float(metrics["loss"])

  @staticmethod
  def peak_bytes() -> float:
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats.get("peak_bytes_in_use", float("nan")))


class TorchStep:
  """transformers' Llama: float32 weights, bfloat16 autocast, fused AdamW where CUDA has it."""

  def __init__(self, size: Size, impl: str, remat: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from research.interop.hf_config import hf_config_from_model_config

    self.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    hf = hf_config_from_model_config(model_config(size, remat), "llama")
    hf.update(use_cache=False)
    attn = "eager" if impl == "eager" else "sdpa"
    model = LlamaForCausalLM._from_config(  # pylint: disable=protected-access
        LlamaConfig.from_dict(hf), attn_implementation=attn, dtype=torch.float32)
    self.model = model.to(self.device).train()
    self.forward = torch.compile(self.model) if impl == "compile" else self.model
    decay = [p for p in self.model.parameters() if p.ndim >= 2]
    no_decay = [p for p in self.model.parameters() if p.ndim < 2]
    self.params = decay + no_decay
    self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=LR,
                                 betas=(B1, B2), eps=EPS, fused=self.device == "cuda")
    host = random_batch(size)
    self.inputs = torch.from_numpy(host["inputs"]).long().to(self.device)
    self.targets = torch.from_numpy(host["targets"]).long().to(self.device)
    self.vocab = size.vocab

  def __call__(self) -> float:
    import torch
    with torch.autocast(self.device, dtype=torch.bfloat16):
      logits = self.forward(input_ids=self.inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.view(-1, self.vocab).float(),
                                             self.targets.view(-1))
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, CLIP)
    self.opt.step()
    value = float(loss.detach())  # synchronises
    return value

  def peak_bytes(self) -> float:
    import torch
    return float(torch.cuda.max_memory_allocated()) if self.device == "cuda" else float("nan")


def timed(fn: Callable[[], float]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def bf16_matmul_tflops(n: int = 8192) -> float:
  """The best of a few bf16 [n, n] products through jnp.dot: what this chip delivers."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.bfloat16)
  mm = jax.jit(jnp.dot)
  mm(a, a).block_until_ready()
  best = min(timed(lambda: mm(a, a).block_until_ready()) for _ in range(5))
  return 2 * n ** 3 / best / 1e12


def datasheet_peak() -> tuple[str, float]:
  """(device name, dense bf16 peak FLOP/s) from the planner's table; nan when unknown."""
  import jax
  from research.planning import ACCELERATORS
  kind = jax.devices()[0].device_kind
  for key, acc in ACCELERATORS.items():
    if key in kind.lower().replace(" ", ""):
      return kind, acc.bf16_flops
  return kind, float("nan")


def bench_size(size: Size, steps: int, warmup: int, remat: str, impls: list[str]) -> list[dict]:
  """Builds every step, measures each one's peak memory over its warm-up (one at a time), then
  alternates them step by step and takes medians."""
  import torch
  runners: dict[str, Any] = {}
  peaks: dict[str, float] = {}
  runners["jax"] = JaxStep(size, remat)
  for _ in range(warmup):
    runners["jax"]()
  peaks["jax"] = JaxStep.peak_bytes()
  for impl in impls:
    if torch.cuda.is_available():
      torch.cuda.empty_cache()
      torch.cuda.reset_peak_memory_stats()
    runners[impl] = TorchStep(size, impl, remat)
    for _ in range(warmup):
      runners[impl]()
    peaks[impl] = runners[impl].peak_bytes()
  times: dict[str, list[float]] = {k: [] for k in runners}
  for _ in range(steps):
    for name, run in runners.items():
      times[name].append(timed(run))
  fpt = flops_per_token(size, remat)
  jax_tps = size.tokens / statistics.median(times["jax"])
  rows = []
  for name in runners:
    tps = size.tokens / statistics.median(times[name])
    rows.append(dict(size=size.name, impl=name if name != "jax" else
                     f"jax ({runners['jax'].attention})", tokens_per_s=tps,
                     jax_over_this=jax_tps / tps, model_tflops=fpt * tps / 1e12,
                     peak_gib=peaks[name] / 2 ** 30))
  return rows


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default="smollm2,llama1b")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--remat", default="dots_attention")
  p.add_argument("--torch", default=",".join(TORCH_IMPLS), help="subset of sdpa,eager,compile")
  p.add_argument("--json", default="")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  import jax
  kind, peak = datasheet_peak()
  measured = bf16_matmul_tflops(8192 if jax.default_backend() == "gpu" else 512)
  print(f"device: {kind} ({jax.default_backend()}); bf16 peak {peak / 1e12:.0f} TFLOP/s "
        f"(datasheet), {measured:.0f} TFLOP/s measured (8192^3 jnp.dot)", flush=True)
  rows = []
  for name in args.sizes.split(","):
    size = SIZES[name]
    rows += bench_size(size, args.steps, args.warmup, args.remat, args.torch.split(","))
  denominator = peak if peak == peak else measured * 1e12
  print("\n| size | implementation | tokens/s | JAX / this | MFU | peak memory |")
  print("| --- | --- | ---: | ---: | ---: | ---: |")
  for r in rows:
    r["mfu"] = r["model_tflops"] * 1e12 / denominator
    print(f"| {r['size']} | {r['impl']} | {r['tokens_per_s']:,.0f} | {r['jax_over_this']:.2f}x | "
          f"{r['mfu']:.1%} | {r['peak_gib']:.1f} GiB |")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"device": kind, "peak_flops": peak, "measured_bf16_tflops": measured,
                 "rows": rows}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
