"""scripts/compare_runs.py: one metric of several runs, as a table of shared steps and a plot."""

import os

from research.train.metrics import MetricsWriter
from scripts import compare_runs


def _run(path, key, values, train_every=None):
  with MetricsWriter(path) as w:
    for step, v in values.items():
      w.write(step, {key: v})
      if train_every:
        w.write(step, {"train/loss": v + 1.0})
  return str(path)


def test_table_holds_each_runs_own_key_at_the_steps_both_logged(tmp_path, capsys):
  a = _run(tmp_path / "distill", "eval/lm_loss", {0: 10.9, 25: 6.96, 50: 6.81}, train_every=True)
  b = _run(tmp_path / "text", "eval/loss", {0: 10.9, 25: 7.5, 40: 7.3, 50: 7.1})
  out = tmp_path / "docs" / "cmp.png"
  rc = compare_runs.main([f"{a}:eval/lm_loss=distilled", f"{b}=text-only", f"--out={out}"])
  assert rc == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "| step | distilled | text-only |"
  # Step 40 only exists in one run; the train/loss lines of run a are not eval/lm_loss.
  assert lines[2:5] == ["| 0 | 10.9000 | 10.9000 |", "| 25 | 6.9600 | 7.5000 |",
                        "| 50 | 6.8100 | 7.1000 |"]
  assert os.path.getsize(out) > 1000 and not os.path.exists(f"{out}.tmp.png")


def test_a_missing_key_names_the_run_and_the_keys_it_has(tmp_path, capsys):
  a = _run(tmp_path / "distill", "eval/lm_loss", {0: 1.0})
  assert compare_runs.main([f"{a}:eval/loss"]) == 2
  err = capsys.readouterr().err
  assert f"{a}: no metric 'eval/loss'; it has eval/lm_loss" in err
  assert compare_runs.main([str(tmp_path / "nowhere")]) == 2
  assert "no metrics.jsonl here" in capsys.readouterr().err
