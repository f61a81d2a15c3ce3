"""Train-step benchmark on the host CPU: this codebase's jitted JAX step against transformers'
`LlamaForCausalLM` on torch (eager), float32, AdamW, same shapes, alternated in one process.

  python -m scripts.bench_train [--sizes=S,M] [--steps=N] [--quick] [--torch-attn=sdpa|eager]

Prints per size the median tokens/s of both and their ratio, MFU against the float32 matmul rate the
script measures between the alternated steps (and, beside it, against the best rate seen in the
run; see `MatmulRate`), peak RSS of each framework (each measured alone in a child
process: `--only=jax|torch --size=S`), and the compile time of the JAX step at 2 and 16 layers (S
widths).

Allocator: XLA:CPU allocates each step's temporaries afresh, and glibc serves large blocks with
new mmaps, so every step page-faults its working set in again; torch's eager step does the same
with its activations. The script therefore re-executes itself once under
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (malloc asks for transparent huge pages, which removes most
of the faults), the setting the README recommends for CPU training, unless `--default-allocator`
is given. Both frameworks share the process (and
the RSS children inherit its environment), so both run under the same allocator either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, NamedTuple

import numpy as np


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

  @property
  def tokens(self) -> int:
    return self.batch * self.seq


SIZES = {
    "S": Size("S", vocab=8192, hidden=256, layers=4, heads=4, kv_heads=4, mlp=688, batch=8, seq=256),
    "M": Size("M", vocab=32000, hidden=512, layers=8, heads=8, kv_heads=2, mlp=1376, batch=4,
              seq=512),
}
# The optimizer both frameworks run: AdamW, constant lr, decay off norms, global-norm clipping.
LR, B1, B2, EPS, WD, CLIP = 3e-4, 0.9, 0.95, 1e-8, 0.1, 1.0
COMPILE_LAYERS = (2, 16)
HUGE_PAGE_MALLOC = "glibc.malloc.hugetlb=1"


def model_config(size: Size, layers: int | None = None):
  from research.models.config import ModelConfig
  return ModelConfig(vocab_size=size.vocab, hidden_size=size.hidden,
                     num_layers=layers or size.layers, num_heads=size.heads,
                     num_kv_heads=size.kv_heads, mlp_dim=size.mlp, rms_norm_eps=1e-6,
                     max_position_embeddings=size.seq, layer_streams=2)


def flops_per_token(size: Size) -> tuple[int, int]:
  """(matmul params N, training FLOPs per token = 6N + attention).

  N leaves out the input embedding (a gather, not a matmul). Attention counts the full T×T score
  and value products, 2·2·T·H·D per token per layer forward, times 3 for forward + backward, as in
  the PaLM MFU formula, whatever a kernel skips: this codebase's causal query blocks compute 62.5%
  of them at S (4 blocks) and 56% at M (8), so the formula credits it with work it does not do,
  3.4% of the step's FLOPs at S and 4.3% at M.
  """
  cfg = model_config(size)
  n = cfg.num_params() - cfg.vocab_size * cfg.hidden_size
  attn = 12 * cfg.num_layers * size.seq * cfg.num_heads * cfg.resolved_head_dim
  return n, 6 * n + attn


def mfu(flops_per_token: float, tokens_per_s: float, gflops: float) -> float:
  """Model FLOPs utilisation: the model's FLOPs per second over a measured matmul rate."""
  return flops_per_token * tokens_per_s / (gflops * 1e9)


def random_batch(size: Size, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, size.vocab, size=(size.batch, size.seq + 1)).astype(np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              segment_ids=np.ones((size.batch, size.seq), np.int32),
              positions=np.broadcast_to(np.arange(size.seq, dtype=np.int32),
                                        (size.batch, size.seq)).copy(),
              loss_mask=np.ones((size.batch, size.seq), np.float32))


# ---------------------------------------------------------------- JAX


class JaxParts(NamedTuple):
  step: Callable  # jitted (state, batch) -> (state, metrics), state donated
  init_fn: Callable
  tx: Any
  state_shardings: Any
  batch_sharding: Any
  abstract_state: Any
  abstract_batch: dict[str, Any]
  host_batch: dict[str, np.ndarray]


def jax_parts(size: Size, layers: int | None = None) -> JaxParts:
  """The step exactly as a stage builds it, on a 1-device mesh (the launch configs' model
  settings: scanned layers, remat 'dots_attention', 2 layer streams)."""
  import jax
  from ml_collections import ConfigDict

  from research.parallel.mesh import make_mesh
  from research.stages.lm import decoder_init, lm_loss_fn
  from research.train.builder import abstract_batch_like, build_step

  cfg = model_config(size, layers)
  opt = ConfigDict(dict(lr=LR, warmup_steps=0, schedule="constant", min_lr_ratio=1.0, b1=B1, b2=B2,
                        eps=EPS, weight_decay=WD, clip_norm=CLIP))
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  init_fn = decoder_init(cfg)
  built = build_step(init_fn=init_fn, optimizer=opt, total_steps=1_000_000, mesh=mesh,
                     loss_fn=lm_loss_fn(cfg))
  step, tx, shardings, bs, abstract = (built.train_step, built.tx, built.shardings,
                                       built.batch_sharding, built.abstract)
  host = random_batch(size)
  abstract_batch = abstract_batch_like(host, bs)
  return JaxParts(step, init_fn, tx, shardings, bs, abstract, abstract_batch, host)


class JaxStep:
  """One call = one train step, blocked on its loss and new state (one step in flight at most)."""

  def __init__(self, size: Size):
    import jax
    from research.train.state import init_state
    parts = jax_parts(size)
    self.state = init_state(parts.init_fn, parts.tx, parts.state_shardings, seed=0)
    self.batch = {k: jax.device_put(v, parts.batch_sharding) for k, v in parts.host_batch.items()}
    self.step = parts.step

  def __call__(self) -> float:
    import jax
    self.state, metrics = self.step(self.state, self.batch)
    loss = float(metrics["loss"])
    jax.block_until_ready(self.state)
    return loss


def jax_compile_seconds(size: Size, layers: int) -> float:
  """Trace + lower + compile of the whole train step, from abstract values (no arrays made)."""
  parts = jax_parts(size, layers)
  t0 = time.perf_counter()
  parts.step.lower(parts.abstract_state, parts.abstract_batch).compile()
  return time.perf_counter() - t0


def gflops_of(product: Callable[[], Any], flops: float) -> float:
  """GFLOP/s of one call of `product` (which waits for its result)."""
  t0 = time.perf_counter()
  product()
  return flops / (time.perf_counter() - t0) / 1e9


class JaxMatmul:
  """One f32 [n, n] x [n, n] jnp.dot per call; returns its GFLOP/s."""

  def __init__(self, n: int = 2048):
    import jax
    import jax.numpy as jnp
    self.flops = 2 * n ** 3
    self.a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    self.b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    self.mm = jax.jit(jnp.dot)
    self.mm(self.a, self.b).block_until_ready()

  def __call__(self) -> float:
    return gflops_of(lambda: self.mm(self.a, self.b).block_until_ready(), self.flops)


# ---------------------------------------------------------------- torch


def torch_setup(threads: int) -> None:
  import torch
  torch.set_num_threads(threads)


class TorchStep:
  """transformers' Llama, eager, with the same loss, clipping and AdamW as the JAX step."""

  def __init__(self, size: Size, attn: str):
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from research.interop.hf_config import hf_config_from_model_config

    torch.manual_seed(0)
    hf = hf_config_from_model_config(model_config(size), "llama")
    hf.update(use_cache=False)
    self.model = LlamaForCausalLM._from_config(  # pylint: disable=protected-access
        LlamaConfig.from_dict(hf), attn_implementation=attn, dtype=torch.float32).train()
    decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
    self.params = decay + no_decay
    self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=LR, betas=(B1, B2), eps=EPS)
    host = random_batch(size)
    self.inputs = torch.from_numpy(host["inputs"]).long()
    self.targets = torch.from_numpy(host["targets"]).long()
    self.vocab = size.vocab
    self.ce = F.cross_entropy

  def __call__(self) -> float:
    import torch
    logits = self.model(input_ids=self.inputs).logits
    loss = self.ce(logits.view(-1, self.vocab).float(), self.targets.view(-1))
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, CLIP)
    self.opt.step()
    return float(loss.detach())


class TorchMatmul:
  """One f32 [n, n] x [n, n] torch.mm per call; returns its GFLOP/s."""

  def __init__(self, n: int = 2048):
    import torch
    self.flops = 2 * n ** 3
    self.a, self.b = torch.randn(n, n), torch.randn(n, n)
    self.mm = torch.mm
    self.mm(self.a, self.b)

  def __call__(self) -> float:
    return gflops_of(lambda: self.mm(self.a, self.b), self.flops)


class MatmulRate:
  """The f32 matmul rate of this machine: the better of jnp.dot and torch.mm at 2048².

  `burst()` is the best of a few back-to-back products at the start; `sample()` one product of
  each, taken between the alternated steps, so that the MFU denominator (their median) comes from
  the same minutes, and the same machine state, as the steps it divides: on a shared host the
  rate drifts within minutes, so a burst taken once beside a median of steps taken later would
  mix two machine states. The best rate seen anywhere in the run is reported beside it.
  """

  def __init__(self):
    self.jax, self.torch = JaxMatmul(), TorchMatmul()

  def burst(self, reps: int = 10) -> tuple[float, float]:
    return max(self.jax() for _ in range(reps)), max(self.torch() for _ in range(reps))

  def sample(self) -> float:
    return max(self.jax(), self.torch())


# ---------------------------------------------------------------- driver


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def timed(fn: Callable[[], float]) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) of one step. Only the stepping framework's threads work
  during a step, so CPU time is attributed cleanly; it shows the work when neighbours steal cores."""
  t0, c0 = time.perf_counter(), cpu_seconds()
  loss = fn()
  if not np.isfinite(loss):
    raise FloatingPointError(f"non-finite loss {loss}")
  return time.perf_counter() - t0, cpu_seconds() - c0


def alternate(size: Size, steps: int, warmup: int, attn: str,
              rate: MatmulRate) -> dict[str, Any]:
  """A B A B ...: both frameworks see the same machine state; medians of per-step seconds. After
  each pair, one matmul-rate sample (`MatmulRate.sample`)."""
  t0 = time.perf_counter()
  jax_step = JaxStep(size)
  jax_step()  # compiles
  jax_first = time.perf_counter() - t0
  torch_step = TorchStep(size, attn)
  for _ in range(warmup):
    jax_step()
    torch_step()
  jax_s, torch_s, jax_cpu, torch_cpu, gflops = [], [], [], [], []
  for _ in range(steps):
    wall, cpu = timed(jax_step)
    jax_s.append(wall)
    jax_cpu.append(cpu)
    wall, cpu = timed(torch_step)
    torch_s.append(wall)
    torch_cpu.append(cpu)
    gflops.append(rate.sample())
  del jax_step, torch_step
  return dict(jax_s=jax_s, torch_s=torch_s, jax_cpu=jax_cpu, torch_cpu=torch_cpu,
              jax_first_step_s=jax_first, gflops=gflops)


def peak_rss_mb() -> float:
  """This process's peak RSS. ru_maxrss survives fork + exec (a child starts at its parent's peak),
  so children are started before the parent grows; VmHWM, reset by exec, cross-checks it."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
  try:
    with open("/proc/self/status") as f:
      hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    return min(rss, hwm)
  except (OSError, StopIteration):
    return rss


def only(framework: str, size: Size, steps: int, attn: str) -> dict[str, Any]:
  """One framework alone (a child process): peak RSS of build + compile + steps."""
  if framework == "jax":
    step = JaxStep(size)
  else:
    torch_setup(os.cpu_count() or 1)
    step = TorchStep(size, attn)
  secs = [timed(step)[0] for _ in range(steps)]
  return dict(framework=framework, size=size.name, median_s=statistics.median(secs[1:] or secs),
              maxrss_mb=peak_rss_mb())


def child_rss(framework: str, size: Size, steps: int, attn: str) -> float:
  cmd = [sys.executable, "-m", "scripts.bench_train", f"--only={framework}", f"--size={size.name}",
         f"--steps={steps}", f"--torch-attn={attn}"]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
  return json.loads(out.stdout.strip().splitlines()[-1])["maxrss_mb"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="S,M", help="comma-separated: S, M")
  p.add_argument("--steps", type=int, default=0, help="timed steps per framework (0: 10, quick: 3)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps of each after compiling")
  p.add_argument("--quick", action="store_true", help="few steps: a smoke run")
  p.add_argument("--torch-attn", default="sdpa", choices=("sdpa", "eager"),
                 help="transformers attention implementation (sdpa: the faster on CPU)")
  p.add_argument("--no-memory", action="store_true", help="skip the child-process RSS runs")
  p.add_argument("--no-compile", action="store_true", help="skip the 2/16-layer compile timing")
  p.add_argument("--default-allocator", action="store_true",
                 help=f"do not re-run under GLIBC_TUNABLES={HUGE_PAGE_MALLOC} (see the docstring)")
  p.add_argument("--only", choices=("jax", "torch"), help="internal: run one framework alone")
  p.add_argument("--size", default="S", help="internal: the size for --only")
  args = p.parse_args(argv)
  if not args.steps:
    args.steps = 3 if args.quick else 10
  if args.quick:
    args.warmup = 1
  return args


def markdown(rows: list[dict[str, Any]], best: float, compile_s: dict[int, float] | None,
             attn: str) -> str:
  lines = [
      "| size | JAX tok/s | torch tok/s | JAX/torch | JAX MFU | torch MFU | JAX MFU vs best | "
      "torch MFU vs best | JAX peak RSS | torch peak RSS |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    rss = lambda v: "-" if v is None else f"{v / 1024:.2f} GB"
    lines.append(f"| {r['size']} | {r['jax_tps']:,.0f} | {r['torch_tps']:,.0f} | "
                 f"{r['ratio']:.2f}x | {r['jax_mfu']:.0%} | {r['torch_mfu']:.0%} | "
                 f"{r['jax_mfu_best']:.0%} | {r['torch_mfu_best']:.0%} | "
                 f"{rss(r['jax_rss'])} | {rss(r['torch_rss'])} |")
  lines.append("")
  rates = ", ".join(f"{r['size']} {r['gflops']:.0f}" for r in rows)
  lines.append(f"float32, 1 CPU device, AdamW; torch {attn} attention, eager; both frameworks in one "
               f"process, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}. MFU = "
               f"(6·N + attention) FLOPs per token × tokens/s / the f32 matmul rate measured "
               f"between the alternated steps (median of the better of jnp.dot and torch.mm at "
               f"2048² per pair: {rates} GFLOP/s); 'vs best' divides by the best rate seen in the "
               f"run instead ({best:.0f} GFLOP/s). Medians of alternated steps.")
  if compile_s:
    a, b = COMPILE_LAYERS
    lines.append(f"JAX step compile (S widths): {compile_s[a]:.1f} s at {a} layers, "
                 f"{compile_s[b]:.1f} s at {b} layers ({compile_s[b] / compile_s[a]:.2f}x).")
  return "\n".join(lines)


def transparent_huge_pages() -> str:
  """The kernel's THP mode ('always', 'madvise', 'never'), which `glibc.malloc.hugetlb=1` needs
  to be other than 'never' to have any effect."""
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return f.read().split("[")[1].split("]")[0]
  except (OSError, IndexError):
    return "unknown"


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
  if not (args.default_allocator or args.only) and HUGE_PAGE_MALLOC not in tunables:
    # Before anything is imported or allocated: glibc reads its tunables at process start.
    os.execve(sys.executable, [sys.executable, "-m", "scripts.bench_train",
                               *(sys.argv[1:] if argv is None else argv)],
              dict(os.environ, GLIBC_TUNABLES=":".join(tunables + [HUGE_PAGE_MALLOC])))
  # libgomp's default spin-wait makes torch's OpenMP threads burn the cores after each parallel
  # region; beside XLA's pool in one process (or busy neighbours) that slowed torch 2-8x here.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  if args.only:
    print(json.dumps(only(args.only, SIZES[args.size], args.steps, args.torch_attn)))
    return
  sizes = [SIZES[name.strip()] for name in args.sizes.split(",")]
  rss: dict[tuple[str, str], float | None] = {}
  for size in sizes:  # first, while this process is small (see peak_rss_mb)
    for framework in ("jax", "torch"):
      rss[size.name, framework] = (None if args.no_memory else
                                   child_rss(framework, size, 2 if args.quick else 3, args.torch_attn))
    if not args.no_memory:
      print(f"[{size.name}] peak RSS alone: JAX {rss[size.name, 'jax']:.0f} MB, "
            f"torch {rss[size.name, 'torch']:.0f} MB", flush=True)

  import jax
  import torch
  threads = os.cpu_count() or 1
  torch_setup(threads)
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
        f"{threads} threads each; torch attention: {args.torch_attn}; "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')} "
        f"(transparent huge pages: {transparent_huge_pages()}); "
        f"load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores", flush=True)
  rate = MatmulRate()
  jax_burst, torch_burst = rate.burst()
  burst = max(jax_burst, torch_burst)
  print(f"f32 matmul 2048², best of 10 back to back: jnp.dot {jax_burst:.1f}, torch.mm "
        f"{torch_burst:.1f} GFLOP/s", flush=True)

  rows = []
  for size in sizes:
    n, fpt = flops_per_token(size)
    r = alternate(size, args.steps, args.warmup, args.torch_attn, rate)
    jax_med, torch_med = statistics.median(r["jax_s"]), statistics.median(r["torch_s"])
    jax_tps, torch_tps = size.tokens / jax_med, size.tokens / torch_med
    ratios = [t / j for j, t in zip(r["jax_s"], r["torch_s"])]
    gflops = statistics.median(r["gflops"])
    rows.append(dict(size=size.name, jax_tps=jax_tps, torch_tps=torch_tps, ratio=jax_tps / torch_tps,
                     gflops=gflops, jax_mfu=mfu(fpt, jax_tps, gflops),
                     torch_mfu=mfu(fpt, torch_tps, gflops),
                     fpt=fpt, samples=r["gflops"],
                     jax_rss=rss[size.name, "jax"], torch_rss=rss[size.name, "torch"]))
    print(f"[{size.name}] N={n / 1e6:.1f}M matmul params, {fpt / 1e6:.1f} MFLOP/token, "
          f"{size.batch}x{size.seq} tokens; JAX {jax_med * 1e3:.0f} ms/step "
          f"(first step incl. compile {r['jax_first_step_s']:.1f} s), torch {torch_med * 1e3:.0f} "
          f"ms/step; per-pair ratio min/median/max {min(ratios):.2f}/"
          f"{statistics.median(ratios):.2f}/{max(ratios):.2f}; CPU s/step JAX "
          f"{statistics.median(r['jax_cpu']):.2f}, torch {statistics.median(r['torch_cpu']):.2f} "
          f"(ratio {statistics.median(r['torch_cpu']) / statistics.median(r['jax_cpu']):.2f}); "
          f"load {os.getloadavg()[0]:.1f}; matmul between steps min/median/max "
          f"{min(r['gflops']):.0f}/{gflops:.0f}/{max(r['gflops']):.0f} GFLOP/s", flush=True)

  best = max([burst] + [g for r in rows for g in r["samples"]])
  for r in rows:
    r["jax_mfu_best"] = mfu(r["fpt"], r["jax_tps"], best)
    r["torch_mfu_best"] = mfu(r["fpt"], r["torch_tps"], best)

  compile_s = None
  if not args.no_compile:
    compile_s = {layers: jax_compile_seconds(SIZES["S"], layers) for layers in COMPILE_LAYERS}

  print()
  print(f"{'size':<5}{'JAX tok/s':>11}{'torch tok/s':>13}{'ratio':>7}{'JAX MFU':>9}"
        f"{'torch MFU':>11}{'(vs best)':>12}{'JAX RSS':>10}{'torch RSS':>11}")
  for r in rows:
    mb = lambda v: "-" if v is None else f"{v:.0f}MB"
    print(f"{r['size']:<5}{r['jax_tps']:>11,.0f}{r['torch_tps']:>13,.0f}{r['ratio']:>7.2f}"
          f"{r['jax_mfu']:>9.1%}{r['torch_mfu']:>11.1%}"
          f"{r['jax_mfu_best']:>6.0%}/{r['torch_mfu_best']:<5.0%}{mb(r['jax_rss']):>10}"
          f"{mb(r['torch_rss']):>11}")
  print("MFU denominator: the f32 matmul rate measured between the steps (median), "
        + ", ".join(f"{r['size']} {r['gflops']:.1f}" for r in rows)
        + f" GFLOP/s; vs best: {best:.1f} (the best of the start's burst, jnp.dot "
        f"{jax_burst:.1f} / torch.mm {torch_burst:.1f}, and every sample between steps)")
  if compile_s:
    a, b = COMPILE_LAYERS
    print(f"JAX compile, S widths: {a} layers {compile_s[a]:.2f} s, {b} layers {compile_s[b]:.2f} s, "
          f"ratio {compile_s[b] / compile_s[a]:.2f}")
  print()
  print(markdown(rows, best, compile_s, args.torch_attn))


if __name__ == "__main__":
  main()
