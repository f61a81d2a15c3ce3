"""Faults a run must survive or name in one line: a diverging learning rate, a damaged newest
checkpoint, SIGTERM mid-run, a torn metrics file, and bad inputs (config ranges, resume, leftovers,
damaged safetensors, empty prompts, too many new tokens)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import signal

import jax
import numpy as np
import pytest

from configs.pretrain import get_config
from research.data import stdlib_corpus, tokenizer as tokenizer_lib
from research.errors import CheckpointError, ConfigError, DivergedError, UserError
from research.interop.hf_export import export_hf
from research.interop.hf_import import load_hf_checkpoint
from research.models.config import ModelConfig
from research.sampling import decode_length_error
from research.stages import pretrain, setup
from research.stages.config_ranges import check_config_ranges
from research.train import workdir as wd
from research.train.curves import curve_panels
from research.train.metrics import MetricsWriter, ProgressLogger, read_metrics
from research.train.preemption import Preempted

STEPS = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("faults_data")
  corpus = stdlib_corpus.write_stdlib_corpus(str(root / "stdlib.jsonl"), 200_000)
  texts = [json.loads(line)["text"] for line in open(corpus)]
  tokenizer_lib.train_bpe_tokenizer(texts, 512, str(root / "tok"))
  return corpus, str(root / "tok")


def _config(data, **train):
  c = get_config("test")
  c.data.corpus, c.data.tokenizer = data
  c.model.update(num_layers=1)
  c.train.update(steps=STEPS, checkpoint_every=2, eval_every=4, log_every=1, sample_prompts=())
  c.train.update(train)
  return c


def _losses(workdir) -> list[tuple[int, float]]:
  return [(m["step"], m["train/loss"]) for m in read_metrics(workdir) if "train/loss" in m]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  pretrain.run(_config(data), str(workdir))
  return workdir


def test_diverging_lr_stops_with_the_step_and_cause_and_keeps_finite_checkpoints(data, tmp_path):
  c = _config(data, eval_every=0)
  c.optimizer.lr = 1e6
  with pytest.raises(DivergedError, match=r"step \d+: non-finite .*learning rate too high"):
    pretrain.run(c, str(tmp_path))
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  assert steps and steps[-1] < STEPS  # stopped early
  cfg, params, _, _ = wd.load_model(str(tmp_path))
  assert all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(params))
  export_hf(params, cfg, tmp_path / "hf")
  # An export of NaN weights is refused, unless forced.
  params = jax.tree.map(lambda x: x * np.nan, params)
  with pytest.raises(CheckpointError, match="non-finite values.*--allow-non-finite"):
    export_hf(params, cfg, tmp_path / "nan_hf")
  assert not (tmp_path / "nan_hf").exists()


def test_damaged_newest_checkpoint_falls_back_for_export_and_resume(data, straight, tmp_path, capfd):
  run = tmp_path / "run"
  shutil.copytree(straight, run)
  for data_file in (run / "checkpoints" / str(STEPS) / "state").rglob("d/*"):
    data_file.write_bytes(data_file.read_bytes()[:100])  # truncated
  _, params, _, _ = wd.load_model(str(run))
  err = capfd.readouterr().err
  assert f"checkpoint step {STEPS} in" in err and f"falling back to step {STEPS - 2}" in err
  _, want, _, _ = wd.load_model(str(straight), STEPS - 2)
  jax.tree.map(np.testing.assert_array_equal, params, want)

  pretrain.run(_config(data), str(run), resume=True)
  assert _losses(run) == _losses(straight)  # each step once, the same values
  assert f"resuming from step {STEPS - 2}" in capfd.readouterr().out


def _sigterm_at(kill_step: int) -> type[ProgressLogger]:
  """A progress logger that sends this process SIGTERM when step `kill_step` is logged."""
  class KillAt(ProgressLogger):
    def update(self, step, metrics, tokens=0):
      if step == kill_step:
        os.kill(os.getpid(), signal.SIGTERM)
      return super().update(step, metrics, tokens)
  return KillAt


def test_sigterm_saves_the_step_reached_and_resume_ends_as_the_straight_run(
    data, straight, tmp_path, monkeypatch):
  monkeypatch.setattr(setup, "ProgressLogger", _sigterm_at(5))
  with pytest.raises(Preempted, match=r"stopped by SIGTERM after step \d/8: .*--resume") as info:
    pretrain.run(_config(data), str(tmp_path))
  monkeypatch.undo()
  reached = info.value.step
  assert reached >= 5 and str(reached) in os.listdir(tmp_path / "checkpoints")
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers put back
  pretrain.run(_config(data), str(tmp_path), resume=True)
  assert _losses(tmp_path) == _losses(straight)
  assert (tmp_path / "curves.png").stat().st_size > 0


def test_metrics_truncated_to_the_resumed_step_and_torn_line_dropped(tmp_path):
  with MetricsWriter(tmp_path) as writer:
    for step in range(1, 6):
      writer.write(step, {"loss": float(step)})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "lo')  # a kill mid-write
  with MetricsWriter(tmp_path, start_step=3) as writer:  # resumed from the step-3 checkpoint
    for step in range(4, 7):
      writer.write(step, {"loss": 10.0 + step})
  assert [(m["step"], m["loss"]) for m in read_metrics(tmp_path)] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]


@pytest.mark.parametrize("key,value,needle", [
    ("train.keep_checkpoints", 0, "train.keep_checkpoints=0 is out of range: it must be >= 1"),
    ("data.seq_len", 0, "data.seq_len=0 is out of range"),
    ("optimizer.lr", -1e-3, "optimizer.lr=-0.001 is out of range: it must be > 0"),
    ("optimizer.lr", math.nan, "optimizer.lr=nan is not a finite number"),
    ("train.max_bad_steps", -1, "train.max_bad_steps=-1"),
])
def test_config_out_of_range_is_named(key, value, needle):
  c = get_config("test")
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
    check_config_ranges(c)


def test_resume_and_leftovers(tmp_path, capsys):
  with pytest.raises(UserError, match="holds no checkpoint to resume from.*--resume=auto"):
    setup.check_workdir(str(tmp_path), True)
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
  with pytest.raises(UserError, match="metrics.jsonl of an earlier run that saved no checkpoint"):
    setup.check_workdir(str(tmp_path), False)
  setup.check_workdir(str(tmp_path), "auto")
  assert "starting fresh (--resume=auto)" in capsys.readouterr().out
  from experiments.launch import _ResumeParser  # pylint: disable=import-outside-toplevel
  assert [_ResumeParser().parse(v) for v in ("auto", "true", "0")] == ["auto", True, False]


def test_damaged_safetensors_is_named_and_stale_export_temporaries_go(tmp_path):
  cfg = ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                    mlp_dim=32)
  from research.models.decoder import Decoder  # pylint: disable=import-outside-toplevel
  params = Decoder(cfg).init(jax.random.PRNGKey(0), np.zeros((1, 4), np.int32))["params"]
  export_hf(params, cfg, tmp_path / "hf")
  weights = tmp_path / "hf" / "model.safetensors"
  whole = weights.read_bytes()
  for content in (b"", b"garbage" * 50, whole[:len(whole) // 2]):
    weights.write_bytes(content)
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors"):
      load_hf_checkpoint(tmp_path / "hf")
  # A killed export's temporary is removed by the next export to the same place.
  (tmp_path / ".hf.tmp-stale").mkdir()
  export_hf(params, cfg, tmp_path / "hf", overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_generation_inputs_are_named():
  from scripts.generate import read_prompts  # pylint: disable=import-outside-toplevel
  with pytest.raises(UserError, match="prompt 2 is empty"):
    read_prompts(["def ", ""], None)
  cfg = ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                    mlp_dim=32, max_position_embeddings=256)
  assert "at most 246 new tokens" in decode_length_error(cfg, 1, 10, 16, 3000, None)
  assert "GiB" in decode_length_error(cfg, 8, 10, 16, 200, free_bytes=1000)
  assert decode_length_error(cfg, 8, 10, 16, 200, free_bytes=10**9) is None


def test_curve_panels_cover_loss_lr_and_stage_metrics():
  records = [{"step": 1, "train/loss": 2.0, "train/lr": 0.1},
             {"step": 2, "eval/loss": 1.0, "eval/accuracy": 0.5, "eval/tokens": 9.0}]
  assert curve_panels(records) == [("loss", ["train/loss", "eval/loss"]),
                                   ("learning rate", ["train/lr"]),
                                   ("eval/accuracy", ["eval/accuracy"])]


def test_sigterm_in_a_post_training_stage_resumes_as_the_straight_run(
    straight, tmp_path, monkeypatch):
  """The same for SFT (LoRA from the pretrained workdir): the stop, the checkpoint at the step
  reached, and a resume that logs what the straight run logs."""
  from configs.sft import get_config as sft_config
  from research.stages import sft
  records = tmp_path / "sft.jsonl"
  records.write_text("".join(json.dumps({"instruction": f"def f{i}(x):", "input": "",
                                         "output": f"return x + {i}"}) + "\n" for i in range(24)))

  def config():
    c = sft_config("test")
    c.init, c.data.path = str(straight), str(records)
    c.data.update(seq_len=32, eval_fraction=0.0)
    c.train.update(steps=6, checkpoint_every=2, eval_every=0, log_every=1, sample_tokens=1)
    return c

  sft.run(config(), str(tmp_path / "straight"))

  monkeypatch.setattr(setup, "ProgressLogger", _sigterm_at(3))
  with pytest.raises(Preempted, match=r"stopped by SIGTERM after step \d/6") as info:
    sft.run(config(), str(tmp_path / "run"))
  monkeypatch.undo()
  assert str(info.value.step) in os.listdir(tmp_path / "run" / "checkpoints")
  sft.run(config(), str(tmp_path / "run"), resume=True)
  assert _losses(tmp_path / "run") == _losses(tmp_path / "straight")


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "ppo", "dpo", "distill", "grpo"])
def test_every_numeric_field_of_every_preset_has_a_range(stage):
  """A numeric config field without a rule would go unchecked: every preset's fields have one, and
  every preset lies within them."""
  import importlib
  from research.stages.config_ranges import RANGES, _numeric_leaves
  module = importlib.import_module(f"configs.{stage}")
  for preset in module.PRESETS:
    config = module.get_config(preset)
    check_config_ranges(config)
    unruled = [".".join(p) for p, _ in _numeric_leaves(config)
               if (p[-2] if len(p) > 1 else "", p[-1]) not in RANGES]
    assert not unruled, f"configs/{stage}.py:{preset}: no range for {unruled}"


def test_processes_agree_on_the_stop_step(monkeypatch):
  """On several processes the stop request is shared at every sync step (an allgather of each
  process's flag): a process that got no signal stops after the same step as the one that did,
  and none stops between sync steps. The allgather is faked here as process 1 having the signal."""
  from jax.experimental import multihost_utils
  from research.train.preemption import StopSignals
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  gathered = []

  def allgather(flag):
    gathered.append(int(flag))
    return np.array([int(flag), 1])  # [this process (0), process 1 (signalled)]
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  stops = StopSignals(sync_every=10)
  assert [stops.requested(step) for step in (7, 9, 11)] == [False] * 3 and not gathered
  assert stops.requested(10) and gathered == [0]
  assert stops.signal_name == "a signal to another process"
