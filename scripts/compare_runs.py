"""One metric of several runs on one plot, and a markdown table of it at the steps they share.

  python -m scripts.compare_runs --out=docs/distill_vs_text.png \
      runs/distill:eval/lm_loss=distilled runs/text:eval/loss=text-only

Each RUN is `WORKDIR[:KEY][=LABEL]`: a workdir with a metrics.jsonl, the metrics key to draw
(default `--key`, itself `eval/loss`), and the legend label (default the workdir's name). Runs of
different stages name the same quantity differently (distillation's held-out LM loss is
`eval/lm_loss`, pretraining's is `eval/loss`), hence a key per run.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from research.train.metrics import METRICS_FILE, read_metrics


class RunSpecError(ValueError):
  pass


def parse_run(spec: str, default_key: str) -> tuple[str, str, str]:
  """`WORKDIR[:KEY][=LABEL]` -> (workdir, key, label)."""
  body, _, label = spec.partition("=")
  workdir, _, key = body.partition(":")
  workdir, key = workdir.rstrip("/"), key or default_key
  return workdir, key, label or os.path.basename(workdir)


def series(workdir: str, key: str) -> list[tuple[int, float]]:
  """(step, value) of `key` in the run's metrics; one clear error when either is missing."""
  if not os.path.isfile(os.path.join(workdir, METRICS_FILE)):
    raise RunSpecError(f"{workdir}: no metrics.jsonl here; pass a run's --workdir")
  records = read_metrics(workdir)
  points = [(int(r["step"]), float(r[key])) for r in records if key in r]
  if not points:
    keys = sorted({k for r in records for k in r if k != "step"})
    raise RunSpecError(f"{workdir}: no metric {key!r}; it has {', '.join(keys) or 'none'}")
  return points


def markdown_table(runs: Sequence[tuple[str, list[tuple[int, float]]]]) -> str:
  """Rows: the steps every run logged; columns: the runs."""
  shared = sorted(set.intersection(*(set(s for s, _ in pts) for _, pts in runs)))
  lines = ["| step | " + " | ".join(label for label, _ in runs) + " |",
           "| ---: |" + " ---: |" * len(runs)]
  by_step = [dict(pts) for _, pts in runs]
  for step in shared:
    cells = [f"{values[step]:.4f}" for values in by_step]
    lines.append(f"| {step} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(runs: Sequence[tuple[str, list[tuple[int, float]]]], path: str, ylabel: str,
         title: str = "") -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, pts in runs:
    steps, values = zip(*pts)
    ax.plot(steps, values, marker="o", markersize=3, label=label)
  ax.set(xlabel="step", ylabel=ylabel, title=title)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp.png"
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)
  return path


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("runs", nargs="+", help="WORKDIR[:KEY][=LABEL]")
  p.add_argument("--key", default="eval/loss", help="metrics key for runs that name none")
  p.add_argument("--out", help="PNG to write; without it only the table is printed")
  p.add_argument("--title", default="")
  p.add_argument("--ylabel", help="y-axis label (default: the first run's key)")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  specs = [parse_run(s, args.key) for s in args.runs]
  try:
    runs: list[tuple[str, Any]] = [(label, series(wd, key)) for wd, key, label in specs]
  except RunSpecError as e:
    print(f"compare_runs: {e}", file=sys.stderr)
    return 2
  print(markdown_table(runs))
  if args.out:
    print(f"wrote {plot(runs, args.out, args.ylabel or specs[0][1], args.title)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
