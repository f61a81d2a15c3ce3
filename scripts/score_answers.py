"""A reward model's verdict on a trained policy's answers against its reference's answers, on the
run's held-out prompts: did training make the answers better by the reward model's lights?

  python -m scripts.score_answers --workdir=runs/dpo --reward_model=runs/rm \
      [--step=N] [--reference=DIR] [--max_new_tokens=64] [--temperature=0 [--samples=1]]
      [--judge_prompt=full|seen] [--json=F] [--answers=F.jsonl]

The policy (after) and its reference (before: for a LoRA run the base with the adapter off, else
the run's `init` or --reference) answer every held-out prompt of the run (a GRPO, DPO or PPO
workdir) greedily (or --samples times each, sampled at --temperature, both sides with the same
seeds), up to --max_new_tokens, each stopping at its EOS; an answer is then cut at the first
--stop_text (default hh-rlhf's "\\n\\nHuman:", where a model that goes on with the dialogue
starts the next human turn). The reward model (a reward-stage workdir, with its own tokenizer)
scores prompt + answer + its EOS, read at that EOS as in training (so an answer cut at
--max_new_tokens is scored as finished, as PPO scores it). Printed, per side: the mean score and
mean answer length (characters); then the mean gain in units of the reference scores' standard
deviation, how often the policy's answer scores higher (ties count half), and the gain among the
prompts whose two answers are within --length_tolerance of each other in length, so a gain that
only comes from longer or shorter answers shows.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import numpy as np


def cut_at(text: str, stop_text: str) -> str:
  """`text` up to the first `stop_text` ('' keeps it whole)."""
  return text.split(stop_text, 1)[0] if stop_text else text


def compare(before: Sequence[float], after: Sequence[float], len_before: Sequence[int],
            len_after: Sequence[int], length_tolerance: float) -> dict[str, float]:
  """Summary of paired scores (one pair per prompt); lengths in characters. `matched`: pairs whose
  lengths differ by at most `length_tolerance` of the longer one."""
  b, a = np.asarray(before, np.float64), np.asarray(after, np.float64)
  lb, la = np.asarray(len_before, np.float64), np.asarray(len_after, np.float64)
  std = float(b.std(ddof=1)) if len(b) > 1 else 0.0
  gain = a - b
  matched = np.abs(la - lb) <= length_tolerance * np.maximum(np.maximum(la, lb), 1.0)
  out = {"score_before": float(b.mean()), "score_after": float(a.mean()),
         "score_std_before": std, "gain": float(gain.mean()),
         "gain_in_std": float(gain.mean() / std) if std > 0 else float("nan"),
         "win_rate": float(np.mean((gain > 0) + 0.5 * (gain == 0))),
         "length_before": float(lb.mean()), "length_after": float(la.mean()),
         "matched_pairs": int(matched.sum()),
         "gain_matched": float(gain[matched].mean()) if matched.any() else float("nan")}
  return out


def score_answers(workdir: str, reward_model: str, step: int | None = None, reference: str = "",
                  max_new_tokens: int = 64, stop_text: str = "\n\nHuman:",
                  length_tolerance: float = 0.2, batch_size: int = 16, temperature: float = 0.0,
                  samples: int = 1,
                  judge_prompt: str = "full") -> tuple[dict[str, Any], list[dict]]:
  """(the summary of `compare` with the run's names, one record per prompt)."""
  # pylint: disable=import-outside-toplevel
  from research import policy_eval
  from research.errors import ConfigError
  from research.parallel.rules import DEFAULT_RULES
  from research.sampling import SamplingConfig
  from research.stages.grpo import reward_model_function

  if temperature < 0 or samples < 1 or (samples > 1 and temperature == 0):
    raise ConfigError(f"--temperature={temperature} --samples={samples}: the temperature must be "
                      ">= 0 (0: greedy), and several samples per prompt need a temperature > 0")
  run = policy_eval.load_policy_run(workdir, step, reference)
  ids, records = policy_eval.held_out_prompts(run.config, run.tokenizer)
  ids, records = ids * samples, records * samples  # every copy is its own draw
  tok = run.tokenizer
  if judge_prompt not in ("full", "seen"):
    raise ConfigError(f"--judge_prompt={judge_prompt!r}: 'full' or 'seen'")
  # "seen": the prompt as the policy saw it (cut to the run's max_prompt_len), which is also what
  # the reward model scored during PPO; "full": the record's whole prompt.
  prompts = ([r["prompt"] for r in records] if judge_prompt == "full" else
             [tok.decode(i) for i in ids])
  decoding = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                            stop_tokens=(tok.eos_token_id,))

  def answers(model) -> list[str]:
    out = []
    for _, n, _, _, resp, lengths in policy_eval.generate_rows(model, ids, decoding,
                                                               tok.pad_token_id, batch_size):
      out.extend(cut_at(t, stop_text) for t in policy_eval.decode(tok, resp, lengths, n))
    return out

  before, after = answers(run.reference), answers(run.policy)
  rm = reward_model_function(reward_model, run.mesh, DEFAULT_RULES, batch_size=batch_size)
  s_before = rm(prompts, before, records)
  s_after = rm(prompts, after, records)
  summary = {"workdir": workdir, "step": step, "reference": run.reference.source,
             "reward_model": reward_model, "prompts": len(prompts) // samples,
             "temperature": temperature, "samples": samples, "judge_prompt": judge_prompt,
             **compare(s_before, s_after, [len(x) for x in before], [len(x) for x in after],
                       length_tolerance)}
  rows = [{"prompt": p, "before": b, "after": a, "score_before": sb, "score_after": sa}
          for p, b, a, sb, sa in zip(prompts, before, after, s_before, s_after)]
  return summary, rows


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the policy's run (GRPO, DPO or PPO)")
  parser.add_argument("--reward_model", required=True, help="a reward-stage workdir")
  parser.add_argument("--step", type=int, default=None, help="a checkpoint step (default newest)")
  parser.add_argument("--reference", default="", help="reference weights (default: see above)")
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0,
                      help="0: greedy answers; else sampled (both models with the same seeds)")
  parser.add_argument("--samples", type=int, default=1, help="answers per prompt (sampled)")
  parser.add_argument("--stop_text", default="\n\nHuman:")
  parser.add_argument("--judge_prompt", default="full", choices=("full", "seen"),
                      help="what the reward model reads before an answer: the whole prompt, or "
                      "the prompt as the policy saw it (cut to the run's max_prompt_len)")
  parser.add_argument("--length_tolerance", type=float, default=0.2)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--json", default="", help="also write the summary to this file")
  parser.add_argument("--answers", default="", help="write every prompt's answers and scores "
                      "to this jsonl file")
  args = parser.parse_args(argv)
  # pylint: disable=import-outside-toplevel
  from research.errors import UserError
  from research.policy_eval import report
  try:
    summary, rows = score_answers(args.workdir, args.reward_model, args.step, args.reference,
                                  args.max_new_tokens, args.stop_text, args.length_tolerance,
                                  args.batch_size, args.temperature, args.samples,
                                  args.judge_prompt)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  report(summary, args.json)
  if args.answers:
    with open(args.answers, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
