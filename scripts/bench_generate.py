"""Greedy KV-cache decoding speed: this codebase's `generate_tokens` vs transformers' `generate`.

  python scripts/bench_generate.py [--sizes S,M] [--batch 8] [--prompt_len 32] [--new_tokens 128]
                                   [--repeats 5] [--one_core]

Both decode the same weights (a random transformers Llama, saved and imported with
`load_hf_checkpoint`) from the same prompts, exactly `new_tokens` tokens (no EOS stop on either
side), in one process alternating ours / theirs after a warm-up (compile) call of each. Prints the
tokens/s of each, the ratio, and a markdown table. Tokens/s counts new tokens; the time includes
the prompt's prefill.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# bench_train's sizes S and M: hidden, layers, heads, kv heads, mlp, vocab.
SIZES = {
    "S": dict(hidden=256, layers=4, heads=4, kv_heads=4, mlp=688, vocab=8192),
    "M": dict(hidden=512, layers=8, heads=8, kv_heads=2, mlp=1376, vocab=32000),
}


def hf_model_dir(size: dict[str, int], out_dir: str) -> str:
  """A random transformers Llama of `size`, saved (float32 safetensors) into `out_dir`."""
  import torch
  import transformers

  config = transformers.LlamaConfig(
      vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["mlp"],
      num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
      num_key_value_heads=size["kv_heads"], max_position_embeddings=2048, bos_token_id=0,
      eos_token_id=1, pad_token_id=2)
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
  return out_dir


def ours_fn(hf_dir: str, prompts_bp, new_tokens: int) -> Callable[[], Any]:
  """A call that decodes `prompts_bp` greedily with this codebase and returns the new tokens."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from research.interop.hf_import import load_hf_checkpoint
  from research.sampling import SamplingConfig, generate_tokens

  cfg, params = load_hf_checkpoint(hf_dir)
  tokens_bp = jnp.asarray(prompts_bp, jnp.int32)
  segments_bp = jnp.ones_like(tokens_bp)
  sampling = SamplingConfig(max_new_tokens=new_tokens)  # no stop tokens: every row runs to the end
  rng = jax.random.PRNGKey(0)

  def run():
    out_bn, lengths_b = generate_tokens(params, tokens_bp, segments_bp, rng, cfg=cfg,
                                        sampling=sampling, pad_id=cfg.pad_token_id)
    out_bn = np.asarray(out_bn)  # blocks until the loop is done
    assert (np.asarray(lengths_b) == new_tokens).all()
    return out_bn
  return run


def theirs_fn(hf_dir: str, prompts_bp, new_tokens: int) -> Callable[[], Any]:
  """The same with transformers' `generate` (torch, KV cache)."""
  import torch
  import transformers

  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  model.generation_config.eos_token_id = None  # and min_new_tokens: no early stop
  ids = torch.as_tensor(prompts_bp, dtype=torch.long)
  mask = torch.ones_like(ids)

  def run():
    with torch.inference_mode():
      seq = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, use_cache=True,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=2)
    assert seq.shape[1] == ids.shape[1] + new_tokens
    return seq[:, ids.shape[1]:].numpy()
  return run


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def bench_size(name: str, size: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
  import numpy as np

  rng = np.random.default_rng(0)
  prompts_bp = rng.integers(3, size["vocab"], (args.batch, args.prompt_len))
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = hf_model_dir(size, os.path.join(tmp, name))
    ours, theirs = ours_fn(hf_dir, prompts_bp, args.new_tokens), theirs_fn(hf_dir, prompts_bp,
                                                                           args.new_tokens)
  compile_s, ours_tokens = _timed(ours)
  _, theirs_tokens = _timed(theirs)
  times: dict[str, list[float]] = {"ours": [], "theirs": []}
  for _ in range(args.repeats):  # alternated, so that load on the machine hits both alike
    times["ours"].append(_timed(ours)[0])
    times["theirs"].append(_timed(theirs)[0])
  tokens = args.batch * args.new_tokens
  ours_tps = tokens / statistics.median(times["ours"])
  theirs_tps = tokens / statistics.median(times["theirs"])
  pair_ratios = [t / o for o, t in zip(times["ours"], times["theirs"])]
  agree = float(np.mean(ours_tokens == theirs_tokens))
  print(f"{name}: ours {ours_tps:.0f} tok/s, transformers {theirs_tps:.0f} tok/s, ratio "
        f"{ours_tps / theirs_tps:.2f} (per pair {min(pair_ratios):.2f}-{max(pair_ratios):.2f}); "
        f"first call {compile_s:.1f} s; greedy tokens equal {agree:.1%}", flush=True)
  return dict(name=name, ours=ours_tps, theirs=theirs_tps, ratio=ours_tps / theirs_tps,
              pair_min=min(pair_ratios), pair_max=max(pair_ratios), agree=agree)


def markdown(rows: Sequence[dict[str, Any]], args: argparse.Namespace) -> str:
  lines = [f"Greedy decoding, batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new "
           f"tokens, KV cache, float32 (median of {args.repeats}, alternated):", "",
           "| size | ours (tok/s) | transformers (tok/s) | ours / transformers |",
           "|---|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['ours']:.0f} | {r['theirs']:.0f} | {r['ratio']:.2f} "
                 f"({r['pair_min']:.2f}-{r['pair_max']:.2f}) |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="scripts/bench_generate.py",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="S,M", help=f"comma-separated, of {sorted(SIZES)}")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--one_core", action="store_true",
                      help="pin the process to one CPU core, torch to one thread (fairer on a "
                           "host busy with other jobs, where torch's OpenMP threads that wait "
                           "for each other slow it down many times over)")
  args = parser.parse_args(argv)
  names = [s.strip() for s in args.sizes.split(",") if s.strip()]
  unknown = sorted(set(names) - set(SIZES))
  if unknown or not names:
    print(f"error: --sizes={args.sizes}: choose among {sorted(SIZES)}", file=sys.stderr)
    return 2
  if args.one_core:  # before jax starts: XLA sizes its thread pool by the CPUs it may run on
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  import jax
  import torch
  if args.one_core:
    torch.set_num_threads(1)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, {len(os.sched_getaffinity(0))} of {os.cpu_count()} "
        "CPUs", flush=True)
  rows = [bench_size(name, SIZES[name], args) for name in names]
  print()
  print(markdown(rows, args))
  return 0


if __name__ == "__main__":
  sys.exit(main())
