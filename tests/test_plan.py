"""Planning cross-checks on a config small enough to run here: state bytes per device match a
really initialised state, the shape-based memory plan is within 2x of XLA's memory analysis, and
XLA's FLOPs (loop bodies extrapolated) match 6·N·tokens + attention within 15%."""

import json
import os

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
  assert r["step_s"] >= r["compute_s"] > 0 and 0 < r["mfu_bound"] <= 1.0


def test_report_warns_when_it_does_not_fit(planned):
  fields = {k: v for k, v in planned[0].items() if k not in ("config", "fits", "roofline",
                                                             "tokens")}
  plan = planning.Plan(**{**fields, "accelerator": planning.Accelerator(**fields["accelerator"])})
  text = plan_cli.format_plan(plan, "small")
  assert "fits" in text and "TFLOP" in text and "WARNING" not in text
  plan.accelerator = planning.Accelerator("tiny", 1e12, 1e11, 2 ** 20)
  text = plan_cli.format_plan(plan, "small")
  assert "DOES NOT FIT" in text and "WARNING" in text
  with pytest.raises(ConfigError, match="unknown accelerator"):
    planning.get_accelerator("h900")
