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
import sys
from typing import Any

import numpy as np


def kl_sums(logp_nr: np.ndarray, ref_logp_nr: np.ndarray, mask_nr: np.ndarray) -> dict[str, float]:
  """Sums over a batch's masked-in tokens, so batches add up: `tokens`, `k1`, `k3`, `sequences`.
  `k1 / sequences` is the mean over completions of their summed log-ratio."""
  # pylint: disable=import-outside-toplevel
  from research.objectives.ppo import kl_penalty  # the estimators the training steps log
  mask = np.asarray(mask_nr, np.float64)
  k1, k3 = (np.asarray(kl_penalty(logp_nr, ref_logp_nr, kind), np.float64)
            for kind in ("k1", "k3"))
  return {"tokens": float(mask.sum()), "k1": float((k1 * mask).sum()),
          "k3": float((k3 * mask).sum()), "sequences": float(len(mask))}


def summarize(sums: dict[str, float]) -> dict[str, float]:
  tokens = max(sums["tokens"], 1.0)
  return {"kl": sums["k3"] / tokens, "kl_k1": sums["k1"] / tokens,
          "kl_sequence": sums["k1"] / max(sums["sequences"], 1.0),
          "mean_length": sums["tokens"] / max(sums["sequences"], 1.0)}


def held_out_kl(workdir: str, step: int | None = None, samples: int = 4,
                reference: str = "", batch_size: int = 32, seed: int = 0) -> dict[str, Any]:
  """The metrics of the module docstring for the policy at `step` (None: the newest)."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  from research import policy_eval
  from research.data import arithmetic
  from research.errors import ConfigError
  from research.stages import grpo
  from research.stages.ppo_step import response_logprobs

  run = policy_eval.load_policy_run(workdir, step, reference)
  if run.config.stage != "grpo":
    raise ConfigError(f"{workdir} is a {run.config.stage!r} run; policy_kl samples with a GRPO "
                      "run's settings (for DPO, scripts/score_answers compares the answers)")
  s = grpo.settings_from(run.config, run.tokenizer)
  ids, held_out = policy_eval.held_out_prompts(run.config, run.tokenizer)
  rows = [i for i in range(len(ids)) for _ in range(samples)]
  pol, ref = run.policy, run.reference

  def logprobs(model):
    return jax.jit(lambda prm, q, g, r: response_logprobs(prm, model.cfg, model.peft, q, g,
                                                          q.shape[1] - r.shape[1], r)[0])
  pol_logp, ref_logp = logprobs(pol), logprobs(ref)

  totals: dict[str, float] = {}
  correct = 0
  with_answers = all("answer" in ex for ex in held_out)
  for lo, n, t, g, resp, lengths in policy_eval.generate_rows(
      pol, [ids[i] for i in rows], s.sampling, s.pad_id, batch_size, seed):
    mask = (np.arange(resp.shape[1])[None, :] < lengths[:, None]).astype(np.int32)
    seq, seg = jnp.asarray(np.concatenate([t, resp], 1)), jnp.asarray(np.concatenate([g, mask], 1))
    batch = kl_sums(*(np.asarray(x)[:n] for x in (pol_logp(pol.params, seq, seg, resp),
                                                   ref_logp(ref.params, seq, seg, resp), mask)))
    totals = {k: totals.get(k, 0.0) + v for k, v in batch.items()}
    if with_answers:
      texts = policy_eval.decode(run.tokenizer, resp, lengths, n)
      correct += sum(arithmetic.is_correct(c, held_out[rows[lo + i]]["answer"],
                                           run.config.reward.tag) for i, c in enumerate(texts))
  out: dict[str, Any] = {"workdir": workdir, "step": step, "reference": ref.source,
                         "prompts": len(ids), "samples": samples,
                         "temperature": s.sampling.temperature, **summarize(totals)}
  if with_answers:
    out["accuracy"] = correct / max(len(rows), 1)
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
  # pylint: disable=import-outside-toplevel
  from research.errors import UserError
  from research.policy_eval import report
  try:
    result = held_out_kl(args.workdir, args.step, args.samples, args.reference, args.batch_size,
                         args.seed)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  report(result, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
