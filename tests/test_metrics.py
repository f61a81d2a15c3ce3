"""MetricsWriter (jsonl + TensorBoard), save_config, read_metrics and the progress line."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax.numpy as jnp
import pytest

from research.train.metrics import (MetricsWriter, ProgressLogger, format_progress, read_metrics,
                                    save_config)


def test_metrics_writer_jsonl_and_tensorboard(tmp_path: Any) -> None:
  workdir = str(tmp_path / "run")
  with MetricsWriter(workdir) as writer:
    writer.write(1, {"loss": 3.5, "lr": jnp.float32(1e-4)}, prefix="train/")
    writer.write(2, {"loss": jnp.array(2.25), "tokens": 4096}, prefix="train/")
    writer.write(2, {"loss": float("nan")}, prefix="eval/")
  # Append mode: a resumed run continues the same file.
  with MetricsWriter(workdir) as writer:
    writer.write(3, {"loss": 2.0})

  records = read_metrics(workdir)
  assert records[:2] == [
      {"step": 1, "train/loss": 3.5, "train/lr": pytest.approx(1e-4)},
      {"step": 2, "train/loss": 2.25, "train/tokens": 4096.0},
  ]
  assert records[2]["step"] == 2 and math.isnan(records[2]["eval/loss"])
  assert records[3] == {"step": 3, "loss": 2.0}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    assert isinstance(json.loads(line), dict)
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(name.startswith("events.out.tfevents") for name in events)
  assert all(os.path.getsize(os.path.join(workdir, "tensorboard", n)) > 0 for n in events)


def test_disabled_writer_writes_nothing(tmp_path: Any) -> None:
  writer = MetricsWriter(str(tmp_path / "run"), enabled=False)
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert not (tmp_path / "run").exists()
  assert read_metrics(str(tmp_path / "run")) == []


def test_read_metrics_skips_truncated_last_line(tmp_path: Any) -> None:
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
  assert read_metrics(str(tmp_path)) == [{"step": 1, "loss": 2.0}]
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
    read_metrics(str(tmp_path))


def test_save_config_round_trip(tmp_path: Any) -> None:
  config = {"model": {"d_model": 64, "n_layers": 2}, "lr": 3e-4, "name": "tiny", "tags": ["a"]}
  path = save_config(str(tmp_path / "run"), config)
  assert path == os.path.join(str(tmp_path / "run"), "config.json")
  text = open(path).read()
  assert json.loads(text) == config
  assert text.index('"lr"') < text.index('"model"') < text.index('"name"')  # sorted keys
  save_config(str(tmp_path / "run"), {"lr": 1.0})  # overwrite in place, no tmp files left
  assert json.loads(open(path).read()) == {"lr": 1.0}
  assert os.listdir(str(tmp_path / "run")) == ["config.json"]


def test_format_progress() -> None:
  line = format_progress(120, 200, {"loss": 3.214, "perplexity": 24.88, "lr": 3e-4}, 12345.4)
  assert line == "step 120/200  loss 3.214  ppl 24.9  tok/s 12,345  lr 3.0e-04"
  # A loss that is no token NLL (a rank loss) shows no perplexity, but its accuracy.
  assert format_progress(1, 2, {"loss": 0.69, "accuracy": 0.5}, None) == (
      "step 1/2  loss 0.690  accuracy 0.500")


def test_progress_logger_every_n_steps() -> None:
  lines: list[str] = []
  times = iter([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
  logger = ProgressLogger(total_steps=5, every=2, log_fn=lines.append, clock=lambda: next(times))
  results = [logger.update(step, {"loss": 1.0, "perplexity": 2.718}, tokens=100)
             for step in range(1, 6)]
  assert [r is not None for r in results] == [False, True, False, True, True]
  # Step 1 (compile) only starts the clock: 100 tokens in the 1 s up to step 2, and 3 steps left
  # at 1 s each.
  assert lines[0] == "step 2/5  loss 1.000  ppl 2.7  tok/s 100  eta 3s"
  assert lines[1].startswith("step 4/5") and "tok/s 100" in lines[1] and lines[1].endswith("eta 1s")
  assert lines[2].startswith("step 5/5") and "eta" not in lines[2]
