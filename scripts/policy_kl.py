"""How far a GRPO policy has moved from its reference, measured on the run's held-out prompts.

  python -m scripts.policy_kl --workdir=runs/grpo [--step=N] [--samples=4] [--reference=DIR]

Samples `--samples` completions of every held-out prompt from the policy at the run's sampling
settings (fixed keys, so two calls agree), and scores each sampled token under the policy and the
reference. The reference is the base with the adapter off for a LoRA run, else `--reference` (a
workdir or Hugging Face directory; default the run's `init`). Prints, and with `--json` writes:

  kl            per-token mean of the k3 estimator, what the GRPO step logs as `kl` when beta > 0
  kl_k1         per-token mean of log p - log p_ref (unbiased; its mean is the per-token KL)
  kl_sequence   mean over completions of their summed log-ratio: KL(policy || reference) per
                completion, in nats
  mean_length   mean completion length in tokens; `accuracy`: exact answers among the samples
                (tasks whose records carry an `answer`)

A run trained with beta = 0 logs no KL (it holds no reference); this gives it one afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np


def kl_sums(logp_nr: np.ndarray, ref_logp_nr: np.ndarray, mask_nr: np.ndarray) -> dict[str, float]:
  """Sums over a batch's masked-in tokens, so batches add up: `tokens`, `k1`, `k3`, `sequences`.
  `k1 / sequences` is the mean over completions of their summed log-ratio."""
  mask = np.asarray(mask_nr, np.float64)
  logr = np.asarray(ref_logp_nr, np.float64) - np.asarray(logp_nr, np.float64)
  return {"tokens": float(mask.sum()), "k1": float((-logr * mask).sum()),
          "k3": float(((np.expm1(logr) - logr) * mask).sum()),
          "sequences": float(len(mask))}


def summarize(sums: dict[str, float]) -> dict[str, float]:
  tokens = max(sums["tokens"], 1.0)
  return {"kl": sums["k3"] / tokens, "kl_k1": sums["k1"] / tokens,
          "kl_sequence": sums["k1"] / max(sums["sequences"], 1.0),
          "mean_length": sums["tokens"] / max(sums["sequences"], 1.0)}


def read_run_config(workdir: str):
  from ml_collections import ConfigDict  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise SystemExit(f"policy_kl: {workdir} has no config.json; pass the --workdir of a GRPO run")
  with open(path, encoding="utf-8") as f:
    config = ConfigDict(json.load(f))
  if config.get("stage") != "grpo":
    raise SystemExit(f"policy_kl: {workdir} is a {config.get('stage')!r} run; this reads GRPO runs "
                     "(their config names the held-out prompts and the sampling settings)")
  return config


def held_out_kl(workdir: str, step: int | None = None, samples: int = 4,
                reference: str = "", batch_size: int = 32, seed: int = 0) -> dict[str, Any]:
  """The metrics of the module docstring for the policy at `step` (None: the newest)."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  from research.data import arithmetic
  from research.data.tokenizer import load_tokenizer
  from research.models.peft import NO_PEFT, strip_peft
  from research.parallel.mesh import make_mesh
  from research.parallel.rules import DEFAULT_RULES
  from research.sampling import generate_tokens, left_pad
  from research.stages import grpo, setup
  from research.stages.ppo_step import response_logprobs
  from research.train import workdir as wd

  config = read_run_config(workdir)
  mesh = make_mesh({"data": -1})
  cfg, peft, params, tok_dir, _ = wd.load_run(workdir, step, mesh=mesh)
  tokenizer = load_tokenizer(tok_dir)
  s = grpo.settings_from(config, tokenizer)
  held = params.pop("ref", None) if isinstance(params, dict) else None  # full run, beta > 0
  if held is not None and not reference:
    ref_cfg, ref_params, ref_source = cfg, held, "the reference the run held"
  elif peft.method == "lora" and not reference:
    ref_cfg, ref_params, ref_source = cfg, strip_peft(params), "the base, adapter off"
  else:
    ref_source = reference or config.init
    if not ref_source:
      raise SystemExit("policy_kl: the run built its own base (init=''); pass --reference=DIR")
    ref_cfg, ref_params, _ = setup.load_init_weights(ref_source, mesh, DEFAULT_RULES)
  if ref_cfg.vocab_size != cfg.vocab_size:
    raise SystemExit(f"policy_kl: the reference {ref_source} has vocab {ref_cfg.vocab_size}, the "
                     f"policy {cfg.vocab_size}; they must share a tokenizer")

  _, held_out = grpo.task_examples(config.task, config.seed)
  ids = grpo.prompt_ids(held_out, tokenizer, config.task.chat_template, config.task.max_prompt_len)
  rows = [i for i in range(len(ids)) for _ in range(samples)]
  tokens, segments = left_pad([ids[i] for i in rows], s.pad_id)  # one width: one compile
  p = tokens.shape[1]
  logp = jax.jit(lambda prm, q, g, r: response_logprobs(prm, cfg, peft, q, g, p, r)[0])
  ref_logp = jax.jit(lambda prm, q, g, r: response_logprobs(prm, ref_cfg, NO_PEFT, q, g, p, r)[0])

  totals: dict[str, float] = {}
  correct, completions = 0, 0
  with_answers = all("answer" in ex for ex in held_out)
  for b, lo in enumerate(range(0, len(rows), batch_size)):
    t, g = tokens[lo:lo + batch_size], segments[lo:lo + batch_size]
    n = len(t)
    t = np.concatenate([t, np.repeat(t[:1], batch_size - n, 0)])  # one static shape
    g = np.concatenate([g, np.repeat(g[:1], batch_size - n, 0)])
    key = jax.random.fold_in(jax.random.PRNGKey(seed), b)
    resp, lengths = generate_tokens(params, jnp.asarray(t), jnp.asarray(g), key, cfg=cfg,
                                    sampling=s.sampling, pad_id=s.pad_id, peft=peft)
    mask = (jnp.arange(resp.shape[1])[None, :] < lengths[:, None]).astype(jnp.int32)
    seq, seg = jnp.concatenate([jnp.asarray(t), resp], 1), jnp.concatenate([jnp.asarray(g), mask], 1)
    batch = kl_sums(*(np.asarray(x)[:n] for x in (logp(params, seq, seg, resp),
                                                   ref_logp(ref_params, seq, seg, resp), mask)))
    totals = {k: totals.get(k, 0.0) + v for k, v in batch.items()}
    if with_answers:
      resp_np, len_np = np.asarray(resp)[:n], np.asarray(lengths)[:n]
      texts = tokenizer.batch_decode([r[:k].tolist() for r, k in zip(resp_np, len_np)],
                                     skip_special_tokens=True)
      correct += sum(arithmetic.is_correct(c, held_out[rows[lo + i]]["answer"], config.reward.tag)
                     for i, c in enumerate(texts))
      completions += n
  out: dict[str, Any] = {"workdir": workdir, "step": step, "reference": ref_source,
                         "prompts": len(ids), "samples": samples,
                         "temperature": s.sampling.temperature, **summarize(totals)}
  if with_answers:
    out["accuracy"] = correct / max(completions, 1)
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--step", type=int, default=None, help="a checkpoint step (default newest)")
  parser.add_argument("--samples", type=int, default=4, help="completions per held-out prompt")
  parser.add_argument("--reference", default="", help="reference weights (default: see above)")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default="", help="also write the result to this file")
  args = parser.parse_args(argv)
  if args.samples < 1:
    parser.error(f"--samples={args.samples} must be at least 1")
  result = held_out_kl(args.workdir, args.step, args.samples, args.reference, args.batch_size,
                       args.seed)
  print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in result.items()), flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
