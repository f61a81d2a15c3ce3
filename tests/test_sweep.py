"""Sweeps: trial expansion, a 2x2 grid run with a fake launcher (failures reported, resume, retry),
emitted commands / SLURM array, and one real trial through scripts/sweep.py."""

import csv
import json
import os
import shlex
import subprocess
import sys

import pytest

from research import sweeps
from research.errors import ConfigError, UserError
from scripts import sweep as sweep_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/pretrain.py:test"
GRID = {"grid": {"optimizer.lr": [1e-3, 3e-3], "optimizer.schedule": ["cosine", "bogus"]}}


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
  monkeypatch.chdir(ROOT)  # config paths are relative to the repository, as on the command line


def test_expand_grid_times_random_draws_is_seeded():
  spec = {"grid": {"optimizer.lr": [1e-3, 3e-3], "peft.r": [4, 8]},
          "random": {"n": 2, "params": {"optimizer.b2": {"log_uniform": [0.9, 0.999]},
                                        "peft.dropout": {"uniform": [0.0, 0.2]},
                                        "train.steps": {"uniform": [10, 20]},
                                        "peft.targets": {"choice": [["q", "v"], ["q"]]}}},
          "fixed": {"train.global_batch": 4}, "seed": 3}
  base = sweeps.resolve_config("configs/sft.py:test")
  trials = sweeps.expand(spec, base)
  assert len(trials) == 8 and [t.name for t in trials][:2] == ["trial_000", "trial_001"]
  assert [(t.overrides["optimizer.lr"], t.overrides["peft.r"]) for t in trials[::2]] == [
      (1e-3, 4), (1e-3, 8), (3e-3, 4), (3e-3, 8)]
  for t in trials:
    o = t.overrides
    assert 0.9 <= o["optimizer.b2"] <= 0.999 and 0.0 <= o["peft.dropout"] <= 0.2
    assert isinstance(o["train.steps"], int) and 10 <= o["train.steps"] <= 20  # int field
    assert o["peft.targets"] in (["q", "v"], ["q"]) and o["train.global_batch"] == 4
  assert trials == sweeps.expand(spec, base)  # same seed, same trials
  assert trials != sweeps.expand({**spec, "seed": 4}, base)
  # Every override parses back to its value through the entry points' own flag parser.
  resolved = sweeps.resolve_config("configs/sft.py:test", sweeps.override_args(trials[5].overrides))
  assert resolved.peft.targets == tuple(trials[5].overrides["peft.targets"])
  assert resolved.optimizer.b2 == trials[5].overrides["optimizer.b2"]


@pytest.mark.parametrize("spec, needle", [
    ({"grid": {"optimizer.lrr": [1.0]}}, "optimizer.lrr"),
    ({"grid": {"optimizer.lr": []}}, "non-empty"),
    ({"random": {"n": 2, "params": {"optimizer.lr": {"normal": [0, 1]}}}}, "log_uniform"),
    ({"random": {"n": 2, "params": {"optimizer.lr": {"log_uniform": [0, 1]}}}}, "low > 0"),
    ({"gird": {}}, "gird"),
])
def test_bad_specs_fail_before_any_trial(tmp_path, spec, needle):
  with pytest.raises(ConfigError, match=needle):
    sweeps.prepare(CONFIG, spec, str(tmp_path))


@pytest.mark.parametrize("config, name", [("configs/pretrain.py:test", "lr_batch"),
                                          ("configs/pretrain.py:test", "lr_warmup_random"),
                                          ("configs/sft.py:test", "lr_rank"),
                                          ("configs/reward.py:hh_rlhf_smollm2", "folds")])
def test_declared_sweeps_expand(tmp_path, config, name):
  sweep = sweeps.prepare(config, sweep_cli.get_spec(config, name), str(tmp_path))
  assert sweep.trials and not sweep.resolve_errors
  with pytest.raises(UserError, match="lr_warmup_random"):
    sweep_cli.get_spec("configs/pretrain.py:test", "no_such_sweep")


def test_extra_may_not_set_a_swept_field(tmp_path):
  with pytest.raises(ConfigError, match="optimizer.lr"):
    sweeps.prepare(CONFIG, GRID, str(tmp_path), ["--config.optimizer.lr=0.1"])


class FakeLauncher:
  """Writes a loss curve that depends on lr; 'bogus' schedules fail as the real run does."""

  def __init__(self):
    self.calls = []

  def __call__(self, command, trial_dir):
    self.calls.append(os.path.basename(trial_dir))
    args = dict(a[2:].split("=", 1) for a in command if a.startswith("--config."))
    with open(os.path.join(trial_dir, "stderr.log"), "w") as err:
      if args["config.optimizer.schedule"] == "bogus":
        err.write("I1123 some log line\nerror: optimizer.schedule='bogus'; choose 'cosine' or "
                  "'constant'\n")
        return 2
    lr = float(args["config.optimizer.lr"])
    with open(os.path.join(trial_dir, "metrics.jsonl"), "w") as f:
      for step in (1, 2, 3):
        f.write(json.dumps({"step": step, "train/loss": 5.0 - 100 * lr * step}) + "\n")
      f.write(json.dumps({"step": 3, "eval/loss": 5.0 - 300 * lr}) + "\n")
    return 0


def _read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_grid_sweep_reports_failures_resumes_and_retries(tmp_path):
  workdir = str(tmp_path / "sweep")
  sweep = sweeps.prepare(CONFIG, GRID, workdir, ["--config.train.steps=3"])
  launcher = FakeLauncher()
  counts = sweeps.run(sweep, parallel=2, launcher=launcher,
                      log=lambda _: None)
  assert counts["done"] == 2 and counts["failed"] == 2 and sorted(launcher.calls) == [
      "trial_000", "trial_001", "trial_002", "trial_003"]
  paths = sweep_cli.report(sweep, "eval/loss")
  rows = _read_csv(paths["csv"])
  # Best (lowest eval/loss: lr 3e-3) first, then the other finished trial, then the failures.
  assert [(r["trial"], r["status"]) for r in rows] == [
      ("trial_002", "done"), ("trial_000", "done"), ("trial_001", "failed"),
      ("trial_003", "failed")]
  assert float(rows[0]["eval/loss"]) == pytest.approx(5.0 - 0.9)
  assert rows[0]["optimizer.lr"] == "0.003" and rows[0]["step"] == "3"
  assert "choose 'cosine' or 'constant'" in rows[2]["error"] and not rows[0]["error"]
  done = [float(r["eval/loss"]) for r in rows[:2]]
  mean, std = sum(done) / 2, abs(done[0] - done[1]) / 2 ** 0.5
  with open(paths["markdown"]) as f:
    text = f.read()
  assert "| 1 | trial_002 | done |" in text
  assert (f"`eval/loss` over the 2 finished trial(s): mean {mean:.6g}, standard deviation "
          f"{std:.6g} across trials, min {min(done):.6g}, max {max(done):.6g}.") in text
  with open(paths["png"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(workdir, "trial_002", "trial.json")) as f:
    info = json.load(f)
  assert info["overrides"] == {"optimizer.lr": 0.003, "optimizer.schedule": "cosine"}
  assert info["config"]["optimizer"]["lr"] == 0.003 and info["config"]["train"]["steps"] == 3
  assert "--resume" in info["command"] and "--workdir=" + os.path.join(workdir, "trial_002") in \
      info["command"]

  launcher.calls.clear()  # resume: finished trials skipped, failed ones kept
  counts = sweeps.run(sweep, launcher=launcher, log=lambda _: None)
  assert launcher.calls == [] and counts["skipped_done"] == 2 and counts["skipped_failed"] == 2
  os.remove(os.path.join(workdir, "trial_000", sweeps.DONE))  # as if killed mid-run
  sweeps.run(sweep, launcher=launcher, log=lambda _: None)
  assert launcher.calls == ["trial_000"]
  launcher.calls.clear()
  sweeps.run(sweep, retry_failed=True, launcher=launcher,
             log=lambda _: None)
  assert launcher.calls == ["trial_001", "trial_003"]


def test_emit_commands_and_slurm(tmp_path, capsys):
  workdir = tmp_path / "emit"
  base = [f"--config={CONFIG}", f"--sweep={json.dumps(GRID)}", f"--workdir={workdir}",
          "--extra=--config.train.steps=3"]
  assert sweep_cli.main(base + ["--emit=commands"]) == 0
  lines = (workdir / "commands.txt").read_text().splitlines()
  assert len(lines) == 4
  for k, line in enumerate(lines):
    argv = shlex.split(line)
    assert argv[1:3] == ["-m", "experiments.pretrain"] and f"--config={CONFIG}" in argv
    assert f"--workdir={workdir / f'trial_{k:03d}'}" in argv and "--config.train.steps=3" in argv
  assert "--config.optimizer.schedule=bogus" in lines[3]
  assert json.loads((workdir / "trial_001" / "trial.json").read_text())["overrides"][
      "optimizer.schedule"] == "bogus"
  assert not (workdir / "trial_000" / "metrics.jsonl").exists()  # nothing ran

  assert sweep_cli.main(base + ["--emit=slurm", "--parallel=2"]) == 0
  script = (workdir / "sweep.slurm").read_text()
  assert "#SBATCH --array=0-3%2" in script and "commands.txt" in script
  assert subprocess.run(["bash", "-n", str(workdir / "sweep.slurm")]).returncode == 0
  assert "wrote" in capsys.readouterr().out


def test_real_trial_and_a_bad_override_through_the_cli(tmp_path):
  """One real pretraining trial (seconds of training) beside one whose override cannot parse."""
  workdir = tmp_path / "real"
  extra = ("--config.data.stdlib_max_bytes=60000 --config.data.tokenizer_train_bytes=60000 "
           "--config.data.vocab_size=300 --config.optimizer.warmup_steps=1 "
           "--config.train.eval_every=0 --config.train.checkpoint_every=0 "
           "--config.train.sample_prompts=() --config.train.async_checkpoints=False")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "scripts/sweep.py", f"--config={CONFIG}",
         '--sweep={"grid": {"train.steps": [2, "two"]}}', f"--workdir={workdir}",
         "--metric=train/loss", f"--extra={extra}", "--trial_timeout=240"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = _read_csv(workdir / "results.csv")
  assert [(r["trial"], r["status"]) for r in rows] == [("trial_000", "done"),
                                                       ("trial_001", "failed")]
  assert float(rows[0]["train/loss"]) > 0 and rows[0]["step"] == "2"
  assert "invalid literal for int()" in rows[1]["error"]
  config = json.loads((workdir / "trial_000" / "config.json").read_text())  # written by the run
  assert config["train"]["steps"] == 2 and config["data"]["vocab_size"] == 300
  assert (workdir / "loss_curves.png").stat().st_size > 0

  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert again.returncode == 0 and "0 to run, 1 done, 1 failed (kept)" in again.stdout
