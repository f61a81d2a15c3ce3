"""Linear-probe baseline for a reward config: how well the frozen starting model already ranks the
preference pairs, before any fine-tuning (research/linear_probe.py).

  python -m scripts.probe_reward --config=configs/reward.py:hh_rlhf_smollm2 [--config.x=y ...] \
      [--folds=5] [--every_fold] [--json=FILE]

Reads the reward config's `init` and data (path, max_len, long_prompts, chat_template, eval_count,
eval_fold, seed), tokenizes every record exactly as the reward stage does, forwards each response
once through the frozen decoder (no LoRA, no head), and keeps two feature vectors per response:
`last`, the final hidden state where the score head reads (the EOS), and `mean`, its mean over the
response tokens. For each it reports a Bradley-Terry head's held-out accuracy (L2 chosen by CV on
training pairs only): by nested k-fold over every pair, and on the config's own split. Beside them:
the length baseline (the shorter response preferred) on the same pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import numpy as np

from research import sweeps
from research.errors import UserError


def length_baseline(lengths_nk: np.ndarray, valid_nk: np.ndarray, records: np.ndarray) -> float:
  """Share of the records' valid pairs i < j (i preferred) where i is the shorter (a tie: half)."""
  hits = [1.0 if lengths_nk[r, i] < lengths_nk[r, j] else 0.5 if lengths_nk[r, i] == lengths_nk[
      r, j] else 0.0 for r in records for i in range(lengths_nk.shape[1])
          for j in range(i + 1, lengths_nk.shape[1]) if valid_nk[r, i] and valid_nk[r, j]]
  return float(np.mean(hits)) if hits else float("nan")


def probe(config, folds: int = 5, every_fold: bool = False, log=print) -> dict[str, Any]:
  """The report of the module docstring, as a dict (see `format_report`); `every_fold` adds the
  split score of every `data.eval_fold` the records allow (as a `folds` sweep holds them out), to
  set beside a k-fold sweep of the reward stage fold by fold."""
  # pylint: disable=import-outside-toplevel
  from research import linear_probe
  from research.data import loader
  from research.data import preferences as pref_data
  from research.data import tokenizer as tokenizer_lib
  from research.stages import setup
  from research.stages.reward_probe import pooled_features

  if config.get("stage") != "reward":
    raise UserError(f"the probe reads a reward config; this one is stage={config.get('stage')!r}")
  if not config.init:
    raise UserError("config.init is empty: the probe needs a starting model (a workdir, an HF "
                    "directory or fetch:NAME)")
  records, _ = pref_data.read_preference_splits(config.data.path, 0, config.seed)  # all, in order
  train, test = loader.holdout_split(list(range(len(records))), None, config.data.eval_count,
                                     config.seed, "the preference data", "record",
                                     config.data.get("eval_fold", 0))
  mesh = setup.mesh_from(config)
  cfg, params, tok_dir = setup.load_init_weights(config.init, mesh, setup.rules_from(config),
                                                 config.get("model"))
  tokenizer = tokenizer_lib.load_tokenizer(tok_dir)
  if config.data.get("chat_template", False):
    records = pref_data.chat_records(records, tokenizer)
  rows, report = pref_data.tokenize_preferences(records, tokenizer, config.data.max_len,
                                                config.data.long_prompts)
  if log:
    log(f"probe data: {report}")
  valid_nk = rows["valid_bk"]
  lengths_nk = np.array([[len(r["responses"][j]) if j < len(r["responses"]) else 0
                          for j in range(valid_nk.shape[1])] for r in records])
  features = pooled_features(params, cfg, rows, config.train.eval_batch_size, log=log)
  everything = np.arange(len(records))
  result: dict[str, Any] = {
      "records": len(records), "folds": folds, "seed": config.seed,
      "split": {"train": len(train), "held_out": len(test)},
      "length_baseline": {"all": length_baseline(lengths_nk, valid_nk, everything),
                          "held_out": length_baseline(lengths_nk, valid_nk, np.array(test))}}
  for pooling, feats in features.items():
    nested = linear_probe.nested_cv(feats, valid_nk, folds, config.seed)
    split = linear_probe.split_score(feats, valid_nk, np.array(train), np.array(test),
                                     seed=config.seed) if test else None
    result[pooling] = {"nested_cv": _as_dict(nested), "split": split and _as_dict(split)}
  if every_fold and config.data.eval_count:
    result["every_fold"] = []
    for fold in range(len(records) // config.data.eval_count):
      train_f, test_f = loader.holdout_split(list(range(len(records))), None,
                                             config.data.eval_count, config.seed, fold=fold)
      row = {"fold": fold, "held_out": len(test_f),
             "length_baseline": length_baseline(lengths_nk, valid_nk, np.array(test_f))}
      for pooling, feats in features.items():
        row[pooling] = _as_dict(linear_probe.split_score(
            feats, valid_nk, np.array(train_f), np.array(test_f), seed=config.seed))
      result["every_fold"].append(row)
  return result


def _as_dict(r) -> dict[str, Any]:
  return {"accuracy": r.accuracy, "standard_error": r.standard_error, "log_loss": r.log_loss,
          "pairs": r.pairs, "l2": list(r.l2)}


def format_report(result: dict[str, Any]) -> str:
  split = result["split"]
  lines = [f"{result['records']} records; nested {result['folds']}-fold over all of them, and the "
           f"config's split ({split['train']} train, {split['held_out']} held out)",
           "| features | nested k-fold accuracy | log loss | split: held-out accuracy |",
           "|---|---|---|---|"]
  for pooling in ("last", "mean"):
    nested, own = result[pooling]["nested_cv"], result[pooling]["split"]
    lines.append(f"| {pooling} | {nested['accuracy']:.3f} (se {nested['standard_error']:.3f}) | "
                 f"{nested['log_loss']:.4f} | "
                 + (f"{own['accuracy']:.3f} of {own['pairs']} |" if own else "- |"))
  base = result["length_baseline"]
  lines.append(f"| length baseline | {base['all']:.3f} | | {base['held_out']:.3f} |")
  if result.get("every_fold"):
    lines += ["", "| eval_fold | held out | last | mean | length baseline |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['fold']} | {r['held_out']} | {r['last']['accuracy']:.3f} | "
              f"{r['mean']['accuracy']:.3f} | {r['length_baseline']:.3f} |"
              for r in result["every_fold"]]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="FILE[:PRESET] of a reward config; --config.x=y "
                 "overrides follow")
  p.add_argument("--folds", type=int, default=5, help="outer folds of the nested k-fold")
  p.add_argument("--every_fold", action="store_true", help="also score the split of every "
                 "data.eval_fold (fold by fold beside a `folds` sweep)")
  p.add_argument("--json", default="", help="also write the report here")
  args, rest = sweeps.parse_with_overrides(p, sys.argv[1:] if argv is None else argv)
  try:
    result = probe(sweeps.resolve_config(args.config, rest), args.folds, args.every_fold)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_report(result))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"config": args.config, "overrides": rest, **result}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
