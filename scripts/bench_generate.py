"""Decoding speed: this codebase's `generate_tokens` vs transformers' `generate`, in one process.

Greedy (the default):

  python scripts/bench_generate.py [--sizes S,M] [--batch 8] [--prompt_len 32] [--new_tokens 128]
                                   [--repeats 5] [--one_core]

Both decode the same weights (a random transformers Llama, saved and imported with
`load_hf_checkpoint`) from the same prompts, exactly `new_tokens` tokens (no EOS stop on either
side), in one process alternating ours / theirs after a warm-up (compile) call of each. Prints the
tokens/s of each, the ratio, and a markdown table. Tokens/s counts new tokens; the time includes
the prompt's prefill.

GRPO rollouts (`--grpo`):

  python scripts/bench_generate.py --grpo [--model fetch:smollm2-135m-instruct | HF dir | random:T]
      [--preset smollm2] [--prompts B] [--group_size G] [--max_new_tokens N] [--temperature T]
      [--top_p P] [--variants eos,fixed] [--repeats 3] [--one_core]

The shape one GRPO step samples: B prompts of the shipped arithmetic task, rendered as the GRPO
preset renders them (the tokenizer's chat template, left-padded), each repeated G times; sampled
with the preset's temperature / top-p, each row stopping on its own EOS. Ours is the very function
the GRPO stage samples with (`grpo_step.sample_completions` with `grpo.settings_from` of the
preset); theirs is `model.generate(do_sample=True, ...)` on the same weights (torch float32) with
an attention mask. B, G, N, temperature and top-p default to the preset's. `random:S|M|T` is a
random Llama of that size with the tokenizer of `--tokenizer` (smoke runs).

Variant `eos` stops each row on EOS: tokens/s counts each side's generated tokens up to and
including each row's EOS (the sampling RNGs differ, so the rows differ: each side's tokens, mean
completion length and fraction of rows that stopped on EOS are printed, to show comparable loads).
Variant `fixed` disables EOS on both sides: exactly N tokens per row, the fixed-work comparison.
Tokens/s is the median over the timed calls of tokens / seconds; the time includes the prefill.
"""

from __future__ import annotations

import argparse
import functools
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


# ---------------------------------------------------------------------------------------------
# GRPO rollouts (--grpo)

# A size for smoke runs beside S and M; the vocabulary is the tokenizer's.
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128)
RANDOM_PREFIX = "random:"
VARIANTS = ("eos", "fixed")


def random_hf_dir(size: dict[str, int], tokenizer_dir: str, out_dir: str) -> str:
  """A random transformers Llama of `size` over the tokenizer of `tokenizer_dir` (saved beside it,
  chat template included) in `out_dir`: special ids and vocabulary are the tokenizer's."""
  import torch
  import transformers

  from research.data.tokenizer import load_tokenizer

  tokenizer = load_tokenizer(tokenizer_dir)
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=size["hidden"], intermediate_size=size["mlp"],
      num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
      num_key_value_heads=size["kv_heads"], max_position_embeddings=2048,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id)
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
  tokenizer.save_pretrained(out_dir)
  return out_dir


def eos_lengths(tokens_nw, stops: Sequence[int]):
  """Per row, the tokens generated up to and including its first stop token (all `w` when none)."""
  import numpy as np

  tokens_nw = np.asarray(tokens_nw)
  hit_nw = np.isin(tokens_nw, list(stops)) if stops else np.zeros(tokens_nw.shape, bool)
  first_n = np.argmax(hit_nw, axis=1)
  return np.where(hit_nw.any(axis=1), first_n + 1, tokens_nw.shape[1]).astype(np.int64)


def rollout_counts(tokens_nw, lengths_n, stops: Sequence[int]) -> dict[str, Any]:
  """What one call generated: tokens (sum of the lengths), mean and max completion length, and
  the rows that stopped on a stop token (their last counted token is one)."""
  import numpy as np

  tokens_nw, lengths_n = np.asarray(tokens_nw), np.asarray(lengths_n, np.int64)
  last_n = tokens_nw[np.arange(len(tokens_nw)), np.maximum(lengths_n - 1, 0)]
  stopped_n = (lengths_n > 0) & np.isin(last_n, list(stops)) if stops else np.zeros(
      len(lengths_n), bool)
  return dict(rows=len(lengths_n), tokens=int(lengths_n.sum()), stopped=int(stopped_n.sum()),
              mean_length=float(lengths_n.mean()), max_length=int(lengths_n.max()))


class GRPOBench:
  """The GRPO preset's prompt batch and sampling settings, and the model loaded by both sides.

  `ours(call, eos)` and `theirs(call, eos)` sample one batch of B x G rows (`call` seeds it: the
  training step on our side, torch's seed on theirs) and return (tokens [N, W], lengths [N])."""

  def __init__(self, args: argparse.Namespace, model_dir: str):
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs import grpo as grpo_configs
    from research.data import tokenizer as tokenizer_lib
    from research.parallel.mesh import make_mesh
    from research.stages import grpo, setup
    from research.stages.grpo_step import GRPOModels

    config = grpo_configs.get_config(args.preset)
    s = config.sampling
    s.max_new_tokens = args.max_new_tokens or s.max_new_tokens
    s.temperature = s.temperature if args.temperature is None else args.temperature
    s.top_p = s.top_p if args.top_p is None else args.top_p
    config.grpo.group_size = args.group_size or config.grpo.group_size
    self.prompts = args.prompts or config.train.global_batch
    self.config = config

    # As the GRPO stage loads its init (runtime fields of the preset applied), on one device.
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    self.cfg, self.params, tok_dir = setup.load_init_weights(model_dir, mesh,
                                                             setup.rules_from(config),
                                                             config.get("model"))
    self.tokenizer = tokenizer_lib.load_tokenizer(tok_dir or model_dir)
    self.settings = grpo.settings_from(config, self.tokenizer)
    self.stops = tuple(self.settings.sampling.stop_tokens)
    self.max_new_tokens = self.settings.sampling.max_new_tokens
    self.group_size = self.settings.group_size

    train, _ = grpo.task_examples(config.task, config.seed)
    ids = grpo.prompt_ids(train[:self.prompts], self.tokenizer, config.task.chat_template,
                          config.task.max_prompt_len)
    rows = grpo.prompt_rows(ids, self.tokenizer.pad_token_id)
    g = self.group_size  # as the host step repeats them: rows b*G .. b*G+G-1 are prompt b's
    self.tokens_np = np.repeat(rows["prompt_tokens"], g, axis=0)
    self.segments_np = np.repeat(rows["prompt_segments"], g, axis=0)
    self.prompt_lengths = [len(i) for i in ids]
    self._settings = {True: self.settings, False: dataclasses.replace(
        self.settings, sampling=dataclasses.replace(self.settings.sampling, stop_tokens=()))}
    self.models = GRPOModels(policy_cfg=self.cfg)  # full policy, as with peft.method=none
    self._ours_inputs = (jnp.asarray(self.tokens_np), jnp.asarray(self.segments_np))
    self._torch = self._load_torch(model_dir)

  @property
  def rows(self) -> int:
    return self.tokens_np.shape[0]

  def ours(self, call: int, eos: bool):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from research.stages.grpo_step import sample_completions
    from research.train.state import TrainState

    tokens, segments = self._ours_inputs
    state = TrainState(step=jnp.int32(call), params=self.params, frozen={}, opt_state=(),
                       rng=jax.random.PRNGKey(self.config.seed))
    out_nr, lengths_n = sample_completions(state, tokens, segments, self.models,
                                           self._settings[eos])
    return np.asarray(out_nr), np.asarray(lengths_n)  # blocks until the loop is done

  def _load_torch(self, model_dir: str):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                              dtype=torch.float32).eval()
    model.generation_config = transformers.GenerationConfig()  # only what is passed below
    return (model, torch.as_tensor(self.tokens_np, dtype=torch.long),
            torch.as_tensor(self.segments_np > 0, dtype=torch.long))

  def theirs(self, call: int, eos: bool):
    import torch

    model, ids, mask = self._torch
    n, sampling = self.max_new_tokens, self.settings.sampling
    stop = dict(eos_token_id=list(self.stops)) if eos else dict(eos_token_id=None,
                                                                 min_new_tokens=n)
    torch.manual_seed(call)
    with torch.inference_mode():
      seq = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, use_cache=True,
                           temperature=sampling.temperature, top_p=sampling.top_p,
                           top_k=sampling.top_k, max_new_tokens=n,  # 0: off (None: 50)
                           pad_token_id=self.settings.pad_id, **stop)
    out_nw = seq[:, ids.shape[1]:].numpy()
    return out_nw, eos_lengths(out_nw, self.stops if eos else ())


def bench_grpo_variant(bench: GRPOBench, eos: bool, repeats: int) -> dict[str, Any]:
  """A warm-up call of each side, then `repeats` alternated pairs; per side the tokens/s of each
  call and the counts of what it generated (`calls`: one `rollout_counts` per timed call)."""
  stops = bench.stops if eos else ()
  sides = {"ours": bench.ours, "theirs": bench.theirs}
  res: dict[str, Any] = {"variant": "eos" if eos else "fixed"}
  first = {name: _timed(functools.partial(fn, 0, eos))[0] for name, fn in sides.items()}
  res["first_call_s"] = first
  per: dict[str, dict[str, list]] = {k: {"tps": [], "calls": [], "last": None} for k in sides}
  for call in range(1, repeats + 1):  # alternated, so that load on the machine hits both alike
    for name, fn in sides.items():
      seconds, (tokens_nw, lengths_n) = _timed(functools.partial(fn, call, eos))
      counts = rollout_counts(tokens_nw, lengths_n, stops)
      per[name]["tps"].append(counts["tokens"] / seconds)
      per[name]["calls"].append(counts)
      per[name]["last"] = (tokens_nw, lengths_n)
  for name in sides:
    calls = per[name]["calls"]
    rows = sum(c["rows"] for c in calls)
    tokens = sum(c["tokens"] for c in calls)
    res[name] = dict(tps=statistics.median(per[name]["tps"]), tps_calls=per[name]["tps"],
                     calls=calls, tokens=tokens, mean_length=tokens / rows,
                     stopped=sum(c["stopped"] for c in calls) / rows,
                     max_length=max(c["max_length"] for c in calls), last=per[name]["last"])
  pairs = [o / t for o, t in zip(res["ours"]["tps_calls"], res["theirs"]["tps_calls"])]
  res.update(ratio=res["ours"]["tps"] / res["theirs"]["tps"], pair_min=min(pairs),
             pair_max=max(pairs))
  o, t = res["ours"], res["theirs"]
  print(f"{res['variant']}: ours {o['tps']:.0f} tok/s, transformers {t['tps']:.0f} tok/s, ratio "
        f"{res['ratio']:.2f} (per pair {res['pair_min']:.2f}-{res['pair_max']:.2f}); first call "
        f"ours {first['ours']:.1f} s (compile), transformers {first['theirs']:.1f} s", flush=True)
  for name, r in (("ours", o), ("transformers", t)):
    print(f"  {name}: {r['tokens']} tokens over {repeats} calls of {bench.rows} rows, mean "
          f"completion {r['mean_length']:.1f} (longest {r['max_length']}), stopped on EOS "
          f"{r['stopped']:.0%}", flush=True)
  return res


def grpo_markdown(rows: Sequence[dict[str, Any]], bench: GRPOBench, model: str,
                  repeats: int) -> str:
  s = bench.settings.sampling
  lines = [f"GRPO rollouts of `{model}`: {bench.prompts} prompts x {bench.group_size} completions "
           f"({bench.rows} rows, prompts of {min(bench.prompt_lengths)}-"
           f"{max(bench.prompt_lengths)} tokens, chat template), up to {s.max_new_tokens} new "
           f"tokens, temperature {s.temperature}, top-p {s.top_p}, KV cache, float32 (median of "
           f"{repeats}, alternated; tokens up to each row's EOS):", "",
           "| variant | ours (tok/s) | transformers (tok/s) | ours / transformers | "
           "ours: mean length, stopped | transformers: mean length, stopped |",
           "|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    o, t = r["ours"], r["theirs"]
    lines.append(f"| {r['variant']} | {o['tps']:.0f} | {t['tps']:.0f} | {r['ratio']:.2f} "
                 f"({r['pair_min']:.2f}-{r['pair_max']:.2f}) | {o['mean_length']:.1f}, "
                 f"{o['stopped']:.0%} | {t['mean_length']:.1f}, {t['stopped']:.0%} |")
  return "\n".join(lines)


def resolve_model(model: str, tokenizer: str, tmp: str) -> str:
  """An HF dir for `--model`: `fetch:NAME` (cached), a directory, or `random:SIZE`."""
  from research.interop.model_zoo import resolve_init

  if model.startswith(RANDOM_PREFIX):
    name = model[len(RANDOM_PREFIX):]
    sizes = {**SIZES, "T": TINY}
    if name not in sizes:
      raise SystemExit(f"error: --model={model}: choose random:{{{','.join(sorted(sizes))}}}")
    return random_hf_dir(sizes[name], resolve_init(tokenizer), os.path.join(tmp, name))
  return resolve_init(model)


def run_grpo(args: argparse.Namespace) -> tuple[GRPOBench, list[dict[str, Any]]]:
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  if not variants or set(variants) - set(VARIANTS):
    raise SystemExit(f"error: --variants={args.variants}: choose among {list(VARIANTS)}")
  with tempfile.TemporaryDirectory() as tmp:
    bench = GRPOBench(args, resolve_model(args.model, args.tokenizer, tmp))
    s = bench.settings.sampling
    print(f"{bench.prompts} prompts x {bench.group_size} = {bench.rows} rows, prompt tokens "
          f"{min(bench.prompt_lengths)}-{max(bench.prompt_lengths)}, max_new_tokens "
          f"{s.max_new_tokens}, temperature {s.temperature}, top_p {s.top_p}, top_k {s.top_k}, "
          f"stop tokens {list(bench.stops)}", flush=True)
    rows = [bench_grpo_variant(bench, v == "eos", args.repeats) for v in variants]
  return bench, rows


def build_parser() -> argparse.ArgumentParser:
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
  grpo = parser.add_argument_group("GRPO rollouts (--grpo); unset values come from --preset")
  grpo.add_argument("--grpo", action="store_true",
                    help="bench the GRPO rollout shape instead of greedy decoding of --sizes")
  grpo.add_argument("--model", default="fetch:smollm2-135m-instruct",
                    help="fetch:NAME, a Hugging Face dir, or random:S|M|T (a random Llama over "
                         "--tokenizer's vocabulary)")
  grpo.add_argument("--tokenizer", default="fetch:smollm2-135m-instruct",
                    help="the tokenizer of a random:SIZE model (fetch:NAME or a directory)")
  grpo.add_argument("--preset", default="smollm2", help="of configs/grpo.py")
  grpo.add_argument("--prompts", type=int, default=0, help="B (default: train.global_batch)")
  grpo.add_argument("--group_size", type=int, default=0, help="G (default: grpo.group_size)")
  grpo.add_argument("--max_new_tokens", type=int, default=0,
                    help="default: sampling.max_new_tokens")
  grpo.add_argument("--temperature", type=float, default=None)
  grpo.add_argument("--top_p", type=float, default=None)
  grpo.add_argument("--variants", default="eos,fixed",
                    help="eos: each row stops on EOS; fixed: EOS off, exactly max_new_tokens")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.repeats < 1:
    print(f"error: --repeats={args.repeats} must be >= 1", file=sys.stderr)
    return 2
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
  if args.grpo:
    bench, results = run_grpo(args)
    print()
    print(grpo_markdown(results, bench, args.model, args.repeats))
    return 0
  rows = [bench_size(name, SIZES[name], args) for name in names]
  print()
  print(markdown(rows, args))
  return 0


if __name__ == "__main__":
  sys.exit(main())
