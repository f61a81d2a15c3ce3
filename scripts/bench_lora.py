"""LoRA train-step benchmark on a real model: this codebase's jitted step against transformers +
`peft` on the same checkpoint, LoRA settings, optimizer and batch, alternated in one process.

  python -m scripts.bench_lora [--model=fetch:smollm2-135m-instruct] [--batch=4] [--seq=256]

Prints the median step time of both, their ratio and tokens/s, and each framework's peak RSS
(each measured alone in a child process: `--only=jax|torch`). float32 on CPU; LoRA r=8, alpha 32,
all seven projections, dropout 0 (so both compute the same function), AdamW on the adapters only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import numpy as np

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, LR = 8, 32.0, 1e-4


def batch(vocab: int, rows: int, seq: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, size=(rows, seq + 1)).astype(np.int32)
  ones = np.ones((rows, seq), np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=ones,
              positions=np.broadcast_to(np.arange(seq, dtype=np.int32), ones.shape).copy(),
              loss_mask=ones.astype(np.float32))


def jax_step(model_dir: str, rows: int, seq: int) -> Callable[[], float]:
  """The LoRA step as the SFT stage builds it: base weights frozen, adapters fresh (B = 0)."""
  import flax.linen as nn
  import jax
  from ml_collections import ConfigDict

  from research.models.peft import PeftConfig
  from research.parallel.mesh import make_mesh
  from research.parallel.rules import DEFAULT_RULES
  from research.stages import setup
  from research.stages.lm import decoder_init, lm_loss_fn
  from research.stages.training import overlay
  from research.train.builder import build_step
  from research.train.state import state_from_params

  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  cfg, base, _ = setup.load_init_weights(model_dir, mesh, DEFAULT_RULES)
  peft = PeftConfig(method="lora", r=R, alpha=ALPHA, dropout=0.0, targets=TARGETS)
  opt = ConfigDict(dict(lr=LR, warmup_steps=0, schedule="constant", min_lr_ratio=1.0, b1=0.9,
                        b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=0.0))
  init_fn = decoder_init(cfg, peft)
  built = build_step(init_fn=init_fn, optimizer=opt, total_steps=10 ** 6, mesh=mesh,
                     loss_fn=lm_loss_fn(cfg, peft, deterministic=False))
  trainable, frozen = nn.meta.unbox(jax.jit(init_fn)(jax.random.PRNGKey(0)))
  state = state_from_params(trainable, overlay(frozen, base), built.tx, built.shardings, 0)
  data = {k: jax.device_put(v, built.batch_sharding)
          for k, v in batch(cfg.vocab_size, rows, seq).items()}
  holder = {"state": state}

  def run() -> float:
    holder["state"], metrics = built.train_step(holder["state"], data)
    loss = float(metrics["loss"])
    jax.block_until_ready(holder["state"])
    return loss
  return run


def torch_step(model_dir: str, rows: int, seq: int) -> Callable[[], float]:
  """transformers + peft: the same adapters, AdamW over them, float32."""
  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import AutoModelForCausalLM

  torch.manual_seed(0)
  model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  model.config.use_cache = False
  model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                           target_modules=HF_TARGETS)).train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  host = batch(model.config.vocab_size, rows, seq)
  inputs = torch.from_numpy(host["inputs"]).long()
  targets = torch.from_numpy(host["targets"]).long()

  def run() -> float:
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             targets.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())
  return run


def peak_rss_mb() -> float:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def timed(run: Callable[[], float]) -> float:
  t0 = time.perf_counter()
  run()
  return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="fetch:smollm2-135m-instruct")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--only", choices=("jax", "torch"), help="internal: one framework alone")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  from research.interop.model_zoo import resolve_init
  model_dir = resolve_init(args.model)
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  make = {"jax": jax_step, "torch": torch_step}
  if args.only:
    run = make[args.only](model_dir, args.batch, args.seq)
    for _ in range(3):
      run()
    print(json.dumps({"maxrss_mb": peak_rss_mb()}))
    return 0
  runs = {name: fn(model_dir, args.batch, args.seq) for name, fn in make.items()}
  first = {name: run() for name, run in runs.items()}
  for run in runs.values():
    run()
  times = {name: [] for name in runs}
  for _ in range(args.steps):
    for name, run in runs.items():
      times[name].append(timed(run))
  med = {k: statistics.median(v) for k, v in times.items()}
  rss = {}
  for name in runs:
    out = subprocess.run([sys.executable, "-m", "scripts.bench_lora", f"--only={name}",
                          f"--model={args.model}", f"--batch={args.batch}", f"--seq={args.seq}"],
                         check=True, capture_output=True, text=True)
    rss[name] = json.loads(out.stdout.strip().splitlines()[-1])["maxrss_mb"]
  tokens = args.batch * args.seq
  print(f"model {model_dir}; LoRA r={R} alpha={ALPHA:g} on {'/'.join(TARGETS)}; batch "
        f"{args.batch} x {args.seq}; first losses jax {first['jax']:.4f} torch {first['torch']:.4f}")
  print("| framework | median step | tokens/s | peak RSS |")
  print("| --- | ---: | ---: | ---: |")
  for name in runs:
    print(f"| {name} | {med[name] * 1e3:.0f} ms | {tokens / med[name]:,.0f} | "
          f"{rss[name]:,.0f} MB |")
  print(f"JAX / torch+peft speed: {med['torch'] / med['jax']:.2f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
