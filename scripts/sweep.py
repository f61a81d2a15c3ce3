"""Run, emit or report a sweep declared in a config file's SWEEPS (see research/sweeps.py).

  python scripts/sweep.py --config=configs/sft.py:huanhuan_lora --sweep=lr_rank \
      --workdir=runs/sweep1 [--parallel=N] [--dry_run | --emit=commands|slurm | --report] \
      [--retry_failed] [--metric=eval/loss] [--goal=min|max] [--extra='--config.train.steps=20'] [--trial_timeout=S]

Every trial runs as `python -m experiments.<stage> --config=FILE:PRESET --config.a=b ...
--workdir=WORKDIR/trial_k --resume=auto`. Finished trials (DONE) are skipped on a rerun; failed ones
are retried only with --retry_failed. At the end: results.csv / results.md sorted by --metric (its
last value in each trial's metrics.jsonl) with its mean and spread over the finished trials (over a
seed or a `data.eval_fold` grid, the figure the sweep measures), and loss_curves.png (train/loss of
every trial).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import shlex
import sys
from typing import Any, Sequence

from research import sweeps
from research.errors import UserError
from research.train.metrics import read_metrics


def emit(sweep: sweeps.Sweep, mode: str, parallel: int = 0) -> str:
  """Writes `commands.txt` (one shell line per trial) and for mode 'slurm' a job-array script
  whose task i runs trial i, skipping done trials and leaving DONE or FAILED markers."""
  if mode not in ("commands", "slurm"):
    raise UserError(f"--emit={mode!r}; choose 'commands' or 'slurm'")
  sweeps.write_trial_files(sweep)
  path = os.path.join(sweep.workdir, "commands.txt")
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(shlex.join(c) + "\n" for c in sweep.commands)
  if mode == "commands":
    return path
  script = os.path.join(sweep.workdir, "sweep.slurm")
  throttle = f"%{parallel}" if parallel else ""
  w = shlex.quote(sweep.workdir)
  with open(script, "w", encoding="utf-8") as f:
    f.write(f"""#!/bin/bash
#SBATCH --job-name=sweep-{os.path.basename(sweep.workdir)}
#SBATCH --array=0-{len(sweep.trials) - 1}{throttle}
#SBATCH --output={sweep.workdir}/slurm-%A_%a.out
# Add what one trial needs (--gres=gpu:N, --cpus-per-task, --time) here or on the sbatch line.
set -uo pipefail
cd {shlex.quote(os.getcwd())}
DIR={w}/$(printf 'trial_%03d' "$SLURM_ARRAY_TASK_ID")
[ -e "$DIR/{sweeps.DONE}" ] && {{ echo "$DIR is done"; exit 0; }}
CMD=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {w}/commands.txt)
rm -f "$DIR/{sweeps.FAILED}"
eval "$CMD" > "$DIR/stdout.log" 2> "$DIR/stderr.log"
rc=$?
if [ $rc -eq 0 ]; then touch "$DIR/{sweeps.DONE}"; else echo $rc > "$DIR/{sweeps.FAILED}"; fi
exit $rc
""")
  os.chmod(script, 0o755)
  return script


def split_config_ref(config_ref: str) -> tuple[str, str | None]:
  path, _, preset = config_ref.partition(":")
  return path, preset or None


def load_sweeps(config_ref: str) -> dict[str, Any]:
  """The SWEEPS dict of a config file ({} when it has none)."""
  path, _ = split_config_ref(config_ref)
  if not os.path.isfile(path):
    raise UserError(f"config file {path!r} not found")
  module_spec = importlib.util.spec_from_file_location("_sweep_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return dict(getattr(module, "SWEEPS", {}))


def get_spec(config_ref: str, sweep: str) -> dict[str, Any]:
  """`sweep` names an entry of the file's SWEEPS, or is a JSON spec itself (starts with '{')."""
  if sweep.lstrip().startswith("{"):
    try:
      return json.loads(sweep)
    except json.JSONDecodeError as e:
      raise UserError(f"--sweep is not valid JSON: {e}") from e
  declared = load_sweeps(config_ref)
  if sweep not in declared:
    raise UserError(f"no sweep {sweep!r} in {split_config_ref(config_ref)[0]}; its SWEEPS are "
                      f"{sorted(declared) or 'none'}")
  return declared[sweep]


def _last(records: list[dict], key: str) -> tuple[float | None, int | None]:
  for r in reversed(records):
    if key in r:
      return r[key], r.get("step")
  return None, None


def collect(sweep: sweeps.Sweep, metric: str) -> list[dict[str, Any]]:
  """One row per trial: status, last value of `metric` (and its step), overrides, error."""
  rows = []
  for t in sweep.trials:
    d = sweep.trial_dir(t)
    state = sweeps.trial_state(d)
    status = sweeps.read_json(os.path.join(d, sweeps.STATUS))
    records = read_metrics(d) if os.path.isdir(d) else []
    value, step = _last(records, metric)
    error = ""
    if state == "failed":
      error = status.get("error") or sweeps.error_summary(sweeps.tail(os.path.join(d,
                                                                                  "stderr.log")))
    rows.append({"trial": t.name, "status": state, metric: value, "step": step,
                 **{k: sweeps.format_value(v) for k, v in t.overrides.items()},
                 "train/loss": _last(records, "train/loss")[0],
                 "duration_s": status.get("duration_s"), "error": error})
  return rows


def sort_rows(rows: list[dict], metric: str, goal: str = "min") -> list[dict]:
  """Best first: done trials with the metric by value, then those without it, then failed."""
  sign = 1.0 if goal == "min" else -1.0

  def key(r):
    v = r[metric]
    has = v is not None and not (isinstance(v, float) and math.isnan(v))
    return (r["status"] != "done", not has, sign * v if has else 0.0, r["trial"])

  return sorted(rows, key=key)


def _cell(v: Any) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.6g}"
  return str(v)


def summary(rows: list[dict], metric: str) -> str:
  """One line over the finished trials' last `metric`: over a seed or `data.eval_fold` grid it is
  the figure the sweep measures (with equal folds, the mean is the pooled k-fold value)."""
  values = [float(r[metric]) for r in rows if r["status"] == "done" and r[metric] is not None
            and not math.isnan(float(r[metric]))]
  if not values:
    return f"No finished trial logged `{metric}`."
  mean = sum(values) / len(values)
  line = f"`{metric}` over the {len(values)} finished trial(s): mean {mean:.6g}"
  if len(values) > 1:
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    line += f", standard deviation {std:.6g} across trials, min {min(values):.6g}, " \
            f"max {max(values):.6g}"
  return line + "."


def write_tables(workdir: str, rows: list[dict], metric: str) -> tuple[str, str]:
  columns = ["rank"] + list(dict.fromkeys(k for r in rows for k in r))
  ranked = [{"rank": i + 1, **r} for i, r in enumerate(rows)]
  csv_path, md_path = os.path.join(workdir, "results.csv"), os.path.join(workdir, "results.md")
  with open(csv_path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows({c: _cell(r.get(c)) for c in columns} for r in ranked)
  with open(md_path, "w", encoding="utf-8") as f:
    f.write(f"Sorted by `{metric}` (last value per trial).\n\n")
    f.write("| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns) + "\n")
    for r in ranked:
      f.write("| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in columns) + " |\n")
    f.write("\n" + summary(rows, metric) + "\n")
  return csv_path, md_path


def plot_losses(sweep: sweeps.Sweep, path: str, key: str = "train/loss") -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(9, 5.5))
  for t in sweep.trials:
    d = sweep.trial_dir(t)
    points = [(r["step"], r[key]) for r in (read_metrics(d) if os.path.isdir(d) else [])
              if key in r]
    if points:
      steps, values = zip(*points)
      ax.plot(steps, values, label=f"{t.name}: {sweeps.format_overrides(t.overrides)}"[:90])
  ax.set_xlabel("step")
  ax.set_ylabel(key)
  ax.set_title(f"{os.path.basename(sweep.workdir)}: {key} per trial")
  if ax.lines:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def report(sweep: sweeps.Sweep, metric: str, goal: str = "min") -> dict[str, str]:
  rows = sort_rows(collect(sweep, metric), metric, goal)
  os.makedirs(sweep.workdir, exist_ok=True)
  csv_path, md_path = write_tables(sweep.workdir, rows, metric)
  png = plot_losses(sweep, os.path.join(sweep.workdir, "loss_curves.png"))
  return {"csv": csv_path, "markdown": md_path, "png": png}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="FILE:PRESET, as the entry points take it")
  p.add_argument("--sweep", required=True, help="a name in the file's SWEEPS, or a JSON spec")
  p.add_argument("--workdir", required=True, help="sweep directory; trial k runs in trial_k")
  p.add_argument("--parallel", type=int, default=1, help="trials at a time")
  p.add_argument("--dry_run", action="store_true", help="print the trials, write nothing")
  p.add_argument("--emit", choices=("commands", "slurm"), help="write commands / a SLURM array")
  p.add_argument("--report", action="store_true", help="only write the table and the plot")
  p.add_argument("--retry_failed", action="store_true", help="rerun trials that failed")
  p.add_argument("--metric", default="eval/loss", help="metrics.jsonl key to rank by")
  p.add_argument("--goal", choices=("min", "max"), default="min")
  p.add_argument("--extra", default="", help="arguments added to every trial's command")
  p.add_argument("--trial_timeout", type=float, default=0, help="seconds; then SIGKILL")
  p.add_argument("--python", default=sys.executable, help="interpreter in the trial commands")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  extra = shlex.split(args.extra)
  try:
    spec = get_spec(args.config, args.sweep)
    sweep = sweeps.prepare(args.config, spec, args.workdir, extra, python=args.python)
    for index, message in sweep.resolve_errors.items():
      print(f"warning: trial_{index:03d} will fail: {message}", file=sys.stderr)
    if args.dry_run:
      for t, command in zip(sweep.trials, sweep.commands):
        print(f"{t.name}  {sweeps.format_overrides(t.overrides)}\n  {shlex.join(command)}")
      return 0
    if args.emit:
      path = emit(sweep, args.emit, args.parallel if args.parallel > 1 else 0)
      print(f"wrote {path} ({len(sweep.trials)} trials)")
      return 0
    if not args.report:
      counts = sweeps.run(sweep, parallel=args.parallel, retry_failed=args.retry_failed,
                          launcher=sweeps.SubprocessLauncher(args.trial_timeout))
      print("trials: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    paths = report(sweep, args.metric, args.goal)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted: running trials were killed; a rerun resumes them", file=sys.stderr)
    return 130
  with open(paths["markdown"], encoding="utf-8") as f:
    print(f.read())
  print(f"wrote {paths['csv']}, {paths['markdown']}, {paths['png']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
