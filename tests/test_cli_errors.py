"""Bad input to the pretraining entry point: one clear line naming the cause, exit 2, no traceback."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *args, devices=1):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "experiments.pretrain", "--config=configs/pretrain.py:test",
         f"--workdir={tmp_path / 'run'}", "--config.train.steps=2",
         "--config.optimizer.warmup_steps=1", *args]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  return proc.returncode, proc.stderr


def _assert_clear_error(rc, stderr, *needles):
  assert rc == 2, stderr
  assert "Traceback" not in stderr, stderr
  error_lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(error_lines) == 1, stderr
  for needle in needles:
    assert needle in error_lines[0], error_lines[0]


def test_missing_corpus_file(tmp_path):
  missing = tmp_path / "nope.jsonl"
  _assert_clear_error(*_run(tmp_path, f"--config.data.corpus={missing}"), str(missing))


def test_empty_corpus(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  _assert_clear_error(*_run(tmp_path, f"--config.data.corpus={empty}"), "empty", str(empty))


def test_jsonl_line_without_text_field(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text(json.dumps({"text": "def f(): pass"}) + "\n" + json.dumps({"body": "x"}) + "\n")
  _assert_clear_error(*_run(tmp_path, f"--config.data.corpus={path}"), str(path), "line 2",
                      "'text'")


def test_unknown_config_key(tmp_path):
  _assert_clear_error(*_run(tmp_path, "--config.train.stepz=3"), "stepz", "steps")


def test_mesh_that_does_not_fit_the_devices(tmp_path):
  _assert_clear_error(*_run(tmp_path, "--config.mesh.data=3", devices=2), "needs 3 devices",
                      "2 are available")
