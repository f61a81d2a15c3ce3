"""`<workdir>/curves.png`: a run's curves from its metrics.jsonl, redrawn at every eval.

Panels: the loss (train and eval), the learning rate, and each of the stage's own eval metrics
(reward accuracy, PPO score and KL, ...), all over steps.
"""

from __future__ import annotations

import os
from typing import Any

from research.train.metrics import read_metrics

CURVES_FILE = "curves.png"
_NOT_OWN = ("eval/loss", "eval/perplexity", "eval/tokens")
_MAX_OWN = 4  # stage metric panels, beyond loss and learning rate


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
  pairs = [(r["step"], r[key]) for r in records if key in r]
  return [s for s, _ in pairs], [v for _, v in pairs]


def curve_panels(records: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
  """(title, metric keys) per panel, for the keys these records hold."""
  keys = {k for r in records for k in r if k != "step"}
  loss = [k for k in ("train/loss", "eval/loss") if k in keys] or sorted(
      k for k in keys if k.startswith("train/loss/"))
  panels = [("loss", loss)] if loss else []
  if "train/lr" in keys:
    panels.append(("learning rate", ["train/lr"]))
  own = sorted(k for k in keys if k.startswith("eval/") and k not in _NOT_OWN)
  panels += [(k, [k]) for k in own[:_MAX_OWN]]
  return panels


def plot_curves(workdir: str) -> str | None:
  """Writes `<workdir>/curves.png` (atomically) and returns its path; None without metrics."""
  records = read_metrics(workdir)
  panels = curve_panels(records)
  if not panels:
    return None
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  cols = min(3, len(panels))
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
  for ax, (title, keys) in zip(axes.flat, panels):
    for key in keys:
      steps, values = _series(records, key)
      ax.plot(steps, values, marker="o" if key.startswith("eval/") else None, markersize=3,
              label=key)
    ax.set(title=title, xlabel="step")
    if len(keys) > 1:
      ax.legend()
  for ax in list(axes.flat)[len(panels):]:
    ax.set_visible(False)
  fig.tight_layout()
  path = os.path.join(workdir, CURVES_FILE)
  tmp = os.path.join(workdir, f".{CURVES_FILE}.tmp.png")
  fig.savefig(tmp, dpi=90)
  plt.close(fig)
  os.replace(tmp, path)
  return path
