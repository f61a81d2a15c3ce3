"""Planning cross-checks on a config small enough to run here: state bytes per device match a
really initialised state, the shape-based memory plan is within 2x of XLA's memory analysis, and
XLA's FLOPs (loop bodies extrapolated) match 6·N·tokens + attention within 15%."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from research import planning, sweeps
from research.errors import ConfigError
from research.stages import setup
from research.stages.lm import decoder_init
from research.train.optimizer import make_optimizer
from research.train.state import abstract_state, init_state
from scripts import plan as plan_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/pretrain.py:test", "--config.model.vocab_size=512",
        "--config.model.hidden_size=128", "--config.model.mlp_dim=344",
        "--config.model.num_layers=3", "--config.data.seq_len=128", "--config.mesh.data=2",
        "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
  os.chdir(ROOT)
  out = tmp_path_factory.mktemp("plan") / "plan.json"
  assert plan_cli.main([*ARGS, "--devices=8", "--accelerator=h100", "--fast",
                        f"--json={out}"]) == 0
  config = sweeps.resolve_config(ARGS[0].split("=", 1)[1], ARGS[1:])
  return json.loads(out.read_text()), config


def test_state_bytes_match_a_real_state(planned):
  plan, config = planned
  mesh = setup.mesh_from(config)
  cfg, _ = planning.model_and_peft(config)
  tx, _ = make_optimizer(config.optimizer, config.train.steps)
  init_fn = decoder_init(cfg)
  _, shardings = abstract_state(init_fn, tx, mesh, setup.rules_from(config))
  state = init_state(init_fn, tx, shardings, seed=0)
  device = jax.devices()[0]

  def on_device(tree):
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == device)

  assert plan["memory"]["params"] == on_device(state.params)
  assert plan["memory"]["opt_state"] == on_device(state.opt_state)
  assert plan["params"] == sum(x.size for x in jax.tree.leaves(state.params))
  # What XLA reports as the step's arguments is exactly the state and batch shards planned.
  xla = plan["xla_memory"]
  assert xla["argument_size_in_bytes"] == pytest.approx(
      sum(plan["memory"][k] for k in ("params", "frozen", "opt_state", "other_state", "batch")),
      rel=1e-3)


def test_memory_plan_within_2x_of_xla(planned):
  plan, _ = planned
  memory = plan["memory"]
  assert plan["memory_method"].startswith("XLA memory analysis")
  ratio = memory["estimate_total"] / memory["total"]
  print(f"shape-based / XLA memory: {ratio:.3f}")
  assert 0.5 <= ratio <= 2.0, (memory, plan["estimate"])
  assert plan["fits"] and memory["total"] < 1 * 2 ** 30


def test_flops_match_6nd_plus_attention(planned):
  plan, config = planned
  ratio = plan["flops_xla"] / plan["flops_model"]["total"]
  print(f"XLA / (6·N·tokens + attention) FLOPs: {ratio:.3f}")
  assert 0.85 <= ratio <= 1.15, plan["flops_model"]
  # The loop-free extrapolation equals XLA's count of the step unrolled (3 layers here).
  mesh = setup.mesh_from(config)
  cfg, peft = planning.model_and_peft(config)
  lowered, _ = planning.lowered_step(config, cfg.replace(scan_layers=False), peft, mesh,
                                     setup.rules_from(config), config.train.global_batch, 1)
  unrolled = planning._cost(lowered)["flops"] / mesh.size  # pylint: disable=protected-access
  np.testing.assert_allclose(plan["flops_xla"], unrolled, rtol=1e-3)
  r = plan["roofline"]
  assert r["step_s"] >= r["compute_s"] > 0 and 0 < r["model_flops_share"] <= 1.0
  # An MFU bound only where the HBM floor, not XLA's own FLOPs, sets the step time.
  if r["bound"] == "memory":
    assert r["mfu_bound"] < r["model_flops_share"]
  else:
    assert r["mfu_bound"] is None


def test_peak_and_usable_memory_follow_dtype_and_platform(monkeypatch):
  h100, v5e = planning.get_accelerator("h100"), planning.get_accelerator("v5e")
  assert h100.peak_flops("bfloat16") == 989e12 and h100.peak_flops("float32") == 494e12
  assert h100.usable_bytes == 0.75 * h100.memory_bytes and v5e.usable_bytes == v5e.memory_bytes
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  assert h100.usable_bytes == 0.9 * h100.memory_bytes
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "2")
  with pytest.raises(ConfigError, match="XLA_PYTHON_CLIENT_MEM_FRACTION"):
    _ = h100.usable_bytes


def test_custom_calls_of_a_lowered_module():
  text = ('%0 = stablehlo.custom_call @Sharding(%a) : ...\n'
          '%1 = stablehlo.custom_call @tpu_custom_call(%q, %k) {backend_config = "..."}\n'
          '%2 = "stablehlo.custom_call"(%x) {call_target_name = "__cudnn$fmhaSoftmax"}\n'
          '%3 = stablehlo.custom_call @tpu_custom_call(%q, %k)\n')
  calls = planning.custom_calls(text)
  assert calls == {"tpu_custom_call": 2, "__cudnn$fmhaSoftmax": 1}
  assert planning.attention_kernels(calls) == [
      "cuDNN fused attention (__cudnn$fmhaSoftmax)", "Pallas/Mosaic TPU kernel (tpu_custom_call)"]


def test_plan_cli_runs_from_a_plain_shell():
  """No XLA_FLAGS: the CLI sets the host device count itself, though the config imports jax; the
  plan names the attention kernel of the step lowered for the target GPU."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  small = ["--config.model.num_layers=1", "--config.model.hidden_size=64",
           "--config.model.mlp_dim=128", "--config.model.num_heads=4",
           "--config.model.num_kv_heads=2", "--config.model.head_dim=16",
           "--config.model.vocab_size=256", "--config.data.seq_len=64",
           "--config.train.global_batch=8", "--config.train.micro_batches=1"]
  proc = subprocess.run([sys.executable, "scripts/plan.py", "--config=configs/plan_llama3_8b_fsdp.py",
                         "--fast", *small], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "on 8 x NVIDIA H100 SXM" in proc.stdout
  # The step lowered for the GPU holds cuDNN's fused attention, forward and backward.
  assert "attention on cuda: cudnn" in proc.stdout and "__cudnn$fmha" in proc.stdout
  assert "usable" in proc.stdout


def test_report_warns_when_it_does_not_fit(planned):
  fields = {k: v for k, v in planned[0].items() if k not in ("config", "fits", "roofline",
                                                             "tokens")}
  plan = planning.Plan(**{**fields, "accelerator": planning.Accelerator(**fields["accelerator"])})
  text = plan_cli.format_plan(plan, "small")
  assert "fits" in text and "TFLOP" in text and "WARNING" not in text
  plan.accelerator = planning.Accelerator("tiny", "tpu", 1e12, 1e12, 1e11, 2 ** 20)
  text = plan_cli.format_plan(plan, "small")
  assert "DOES NOT FIT" in text and "WARNING" in text
  with pytest.raises(ConfigError, match="unknown accelerator"):
    planning.get_accelerator("h900")
