"""GRPO end to end on a tiny model: the reward for emitting one token rises on held-out prompts,
a resumed run repeats the straight one (sampling included); rewards as code, and the arithmetic
task's answers and held-out set."""

import json
import math
import shutil
import types

import numpy as np
import pytest

from research import rewards
from research.data import arithmetic
from research.errors import ConfigError, UserError


def test_arithmetic_task_is_checkable_and_its_held_out_set_fixed():
  train0, held0 = arithmetic.train_and_held_out(300, 20, seed=0)
  train1, held1 = arithmetic.train_and_held_out(300, 20, seed=1)
  assert held0 == held1  # the same held-out problems whatever the run's seed
  assert train0 != train1
  assert not {e["prompt"] for e in held0} & {e["prompt"] for e in train0 + train1}
  assert len({e["prompt"] for e in train0}) == 300
  for ex in held0 + train0:  # the stated answer is what the sentences compute
    numbers = [int(n) for n in arithmetic._NUMBER.findall(ex["prompt"])]
    assert int(ex["answer"]) >= 0 and numbers, ex
  ex = {"prompt": "Ava has 3 apples. Then Ava finds 4 more. How many apples does Ava have now?",
        "answer": "7"}
  assert arithmetic.is_correct("3 + 4 = 7, so <answer> 7 </answer>", ex["answer"])
  assert arithmetic.is_correct("3 + 4 is 7", ex["answer"])  # no tags: the last number
  assert not arithmetic.is_correct("<answer>8</answer> not 7", ex["answer"])  # tags win
  assert not arithmetic.is_correct("<answer>seven</answer>", ex["answer"])
  assert arithmetic.worked_text(ex).endswith("<answer>7</answer>")


def test_built_in_rewards_and_weights():
  fns = rewards.build("exact_answer:1.0,answer_format:0.5,length_penalty", {"max_chars": 40})
  total, per_fn = rewards.score(
      fns, ["p", "p", "p"],
      ["<answer>12</answer>", "it is 12", "<answer>3</answer><answer>4</answer> " + "x" * 10],
      [{"answer": "12"}, {"answer": "12"}, {"answer": "4"}])
  np.testing.assert_array_equal(per_fn["exact_answer"], [1, 1, 0])
  np.testing.assert_array_equal(per_fn["answer_format"], [1, 0, 0])  # two answers: not the format
  completion = "<answer>3</answer><answer>4</answer> " + "x" * 10
  np.testing.assert_allclose(per_fn["length_penalty"], [0, 0, -(len(completion) - 40) / 40])
  np.testing.assert_allclose(total, [1.5, 1.0, -(len(completion) - 40) / 40], rtol=1e-6)


def test_a_failing_reward_function_stops_with_one_line_naming_it_and_the_example():
  rewards.register("test_raises")(lambda p, c, ex: 1 / 0 if "boom" in c else 1.0)
  rewards.register("test_not_a_number")(lambda p, c, ex: "high" if "boom" in c else 1.0)
  rewards.register("test_nan")(lambda p, c, ex: math.nan if "boom" in c else 1.0)
  examples = [{"index": 7}, {"index": 8}]
  for name, match in (("test_raises", "raised ZeroDivisionError: division by zero"),
                      ("test_not_a_number", "returned 'high', not a finite number"),
                      ("test_nan", "returned nan, not a finite number")):
    fns = rewards.build(f"{name}:1", {})
    with pytest.raises(UserError, match=match) as info:
      rewards.score(fns, ["q1", "q2"], ["fine", "a boom"], examples)
    message = str(info.value)
    assert "\n" not in message and f"reward function {name!r}" in message
    assert "example 1 (task index 8)" in message and "'a boom'" in message
  with pytest.raises(ConfigError, match="unknown reward 'nope'"):
    rewards.build("nope:1", {})
  with pytest.raises(ConfigError, match="weight after ':' must be a number"):
    rewards.build("exact_answer:high", {})
  with pytest.raises(ConfigError, match="names a function twice"):
    rewards.build("exact_answer,exact_answer:2", {})
  fns = rewards.build("numpy.float64:1", {})  # a dotted path imports a function
  assert fns[0].fn is np.float64


def test_settings_refuse_what_cannot_learn():
  from configs.grpo import get_config
  from research.stages.grpo import settings_from
  tokenizer = types.SimpleNamespace(eos_token_id=2, pad_token_id=0)
  config = get_config("test")
  settings = settings_from(config, tokenizer)
  assert settings.sampling.stop_tokens == (2,) and settings.group_size == 4
  for field, value, match in (("sampling.temperature", 0.0, "greedy sampling"),
                              ("grpo.group_size", 1, "at least 2 completions"),
                              ("grpo.loss_type", "bnpo", "grpo.loss_type='bnpo'"),
                              ("grpo.advantage", "std", "grpo.advantage='std'")):
    bad = get_config("test")
    section, key = field.split(".")
    bad[section][key] = value
    with pytest.raises(ConfigError, match=match):
      settings_from(bad, tokenizer)


TARGET = "1"  # the token whose emission pays


def _grpo_config(base_dir):
  from configs.grpo import get_config
  c = get_config("test")
  c.init = str(base_dir)
  c.reward.functions = "test_emit_target:1.0"
  c.grpo.update(beta=0.04, iterations=2, loss_type="grpo", advantage="rloo")
  c.optimizer.lr = 1e-2
  c.train.update(steps=12, eval_every=12, checkpoint_every=6, log_every=6)
  return c


@pytest.fixture(scope="module")
def grpo_straight(tmp_path_factory):
  """A tiny random model (a BPE tokenizer of 300 tokens from the task's text), then 12 GRPO steps
  rewarding the fraction of completion tokens that are TARGET; iterations=2 and beta>0 exercise
  the old and the reference log-prob programs."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from configs.grpo import get_config
  from research.data.tokenizer import train_bpe_tokenizer
  from research.models.config import ModelConfig
  from research.models.decoder import Decoder
  from research.stages import grpo
  from research.train import workdir as wd
  root = tmp_path_factory.mktemp("grpo")
  train, _ = grpo.task_examples(get_config("test").task, 0)
  tokenizer = train_bpe_tokenizer([arithmetic.worked_text(ex) for ex in train], 300,
                                  str(root / "tokenizer"))
  cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, mlp_dim=64, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
  params = nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(0),
                                           jnp.zeros((1, 4), jnp.int32))["params"])
  wd.write_initial_checkpoint(str(root / "base"), cfg, params, tokenizer)
  target_id = tokenizer(TARGET)["input_ids"]
  assert len(target_id) == 1

  @rewards.register("test_emit_target")
  def emit_target(prompt, completion, example):
    del prompt, completion
    ids = example["completion_ids"]
    return sum(i == target_id[0] for i in ids) / max(len(ids), 1)

  out = grpo.run(_grpo_config(root / "base"), str(root / "straight"))
  return out, root


def _metrics(workdir):
  from research.train.metrics import read_metrics
  return list(read_metrics(workdir))


def test_grpo_raises_the_held_out_reward(grpo_straight):
  """Emitting TARGET pays: within 12 steps the held-out (greedy) reward goes from 0 to at least
  0.5 (seen: 0 -> 1.0 by step 6), and the sampled train reward rises (seen: 0.007 -> 0.05 over
  the first and last 3 steps: at temperature 1 over 300 tokens it moves slower)."""
  _, root = grpo_straight
  metrics = _metrics(root / "straight")
  evals = {m["step"]: m for m in metrics if "eval/reward" in m}
  train = [m for m in metrics if "train/reward" in m]
  assert evals[0]["eval/reward"] == 0.0 and evals[12]["eval/reward"] >= 0.5, evals
  assert np.mean([m["train/reward"] for m in train[-3:]]) > \
      2 * np.mean([m["train/reward"] for m in train[:3]])
  last = train[-1]
  for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/test_emit_target/mean",
              "rewards/test_emit_target/std", "completions/mean_length",
              "completions/clipped_ratio", "kl", "entropy", "clip_ratio/low_mean",
              "clip_ratio/high_mean", "clip_ratio/region_mean", "time/generation",
              "time/scoring", "time/training"):
    assert f"train/{key}" in last, key
  assert last["train/kl"] > 0  # the policy moved away from the reference it started as
  assert 0 < last["train/completions/mean_length"] <= 8
  assert "eval/accuracy" in evals[12]  # the arithmetic task carries answers


def test_grpo_resumed_run_matches_the_straight_one(grpo_straight, tmp_path):
  """The straight run's step-6 checkpoint (what a stop at step 6 leaves) resumed to step 12:
  steps 7-12 log what the straight run logged. Completions are sampled, so a sampling key that
  were not a function of (seed, step), or a lost optimizer state, would show in every metric."""
  from research.stages import grpo
  out, root = grpo_straight
  resumed = tmp_path / "resumed"
  shutil.copytree(root / "straight", resumed)
  shutil.rmtree(resumed / "checkpoints" / "12")
  lines = (resumed / "metrics.jsonl").read_text().splitlines()
  (resumed / "metrics.jsonl").write_text(
      "".join(line + "\n" for line in lines if json.loads(line)["step"] <= 6))
  config = _grpo_config(root / "base")
  config.train.eval_every = 0
  grpo.run(config, str(resumed), resume=True)
  ours = {m["step"]: m for m in _metrics(resumed) if "train/reward" in m}
  ref = {m["step"]: m for m in _metrics(root / "straight") if "train/reward" in m}
  assert sorted(ours) == sorted(ref) == list(range(1, 13))
  for step in range(7, 13):
    for key in ("train/reward", "train/completions/mean_length", "train/loss", "train/kl",
                "train/grad_norm", "train/clip_ratio/region_mean"):
      np.testing.assert_allclose(ours[step][key], ref[step][key], rtol=1e-5, atol=1e-7,
                                 err_msg=f"{key} at step {step}")


def test_lora_reference_is_the_base_with_the_adapter_off():
  """With LoRA the reference log-probs come from the frozen base alone (no copy is held): with an
  adapter that changes outputs, they equal a plain forward of the base."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from research.models.config import ModelConfig
  from research.models.decoder import Decoder
  from research.models.peft import PeftConfig, split_trainable
  from research.objectives.lm import token_nll
  from research.sampling import SamplingConfig
  from research.stages.grpo_step import GRPOModels, GRPOSettings, make_logprob_program
  from research.train.state import TrainState
  cfg = ModelConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64)
  peft = PeftConfig(method="lora", r=4, targets=("q", "v"))
  params = jax.jit(lambda r: nn.meta.unbox(Decoder(cfg, peft).init(
      r, jnp.zeros((1, 4), jnp.int32))["params"]))(jax.random.PRNGKey(0))
  trainable, frozen = split_trainable(params, peft)
  trainable = jax.tree.map(lambda x: x + 0.5, trainable)  # B != 0: the adapter changes outputs
  state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen,
                     opt_state=None, rng=jax.random.PRNGKey(0))
  s = GRPOSettings(sampling=SamplingConfig(max_new_tokens=3), pad_id=0, beta=0.1)
  models = GRPOModels(cfg, peft)
  program = make_logprob_program(models, s)
  seq = jnp.asarray([[5, 6, 7, 8, 9, 10], [0, 11, 12, 13, 14, 1]])
  seg = jnp.asarray([[1] * 6, [0] + [1] * 5])
  out = program(state, {"seq_nl": seq, "seg_nl": seg, "resp_nr": seq[:, 3:]})
  base_logp = jax.jit(lambda p: -token_nll(
      Decoder(cfg).apply({"params": p}, seq, seg)[0][:, 2:5], seq[:, 3:]))(frozen)
  np.testing.assert_allclose(out["ref_logp_nr"], base_logp, atol=1e-5)
  assert set(out) == {"ref_logp_nr"}  # one pass: the old log-probs are the current ones
  lora_leaves = lambda tree: [k for k, _ in jax.tree_util.tree_leaves_with_path(tree)  # noqa: E731
                              if "_lora" in jax.tree_util.keystr(k)]
  assert lora_leaves(models.policy(state.params, state.frozen))
  assert not lora_leaves(models.reference(state.frozen))


def test_policy_kl_sums_match_a_hand_computation():
  """k1 and k3 over the masked-in tokens only, per token and per completion."""
  from scripts.policy_kl import kl_sums, summarize
  logp = np.log(np.array([[0.5, 0.25, 0.9], [0.1, 0.2, 0.3]]))
  ref = np.log(np.array([[0.25, 0.5, 0.1], [0.1, 0.4, 0.6]]))
  mask = np.array([[1, 1, 0], [1, 1, 1]])
  k1 = [np.log(0.5 / 0.25), np.log(0.25 / 0.5), np.log(0.1 / 0.1), np.log(0.2 / 0.4),
        np.log(0.3 / 0.6)]
  k3 = [np.exp(-x) - 1 + x for x in k1]  # r = p_ref / p = exp(-k1); k3 = r - 1 - log r
  got = summarize(kl_sums(logp, ref, mask))
  # float32: the estimators are research.objectives.ppo.kl_penalty, what the steps log
  np.testing.assert_allclose(got["kl_k1"], np.mean(k1), rtol=1e-6)
  np.testing.assert_allclose(got["kl"], np.mean(k3), rtol=1e-6)
  np.testing.assert_allclose(got["kl_sequence"], np.sum(k1) / 2, rtol=1e-6)
  assert got["mean_length"] == 2.5


def test_policy_kl_of_a_run(grpo_straight, capsys):
  """`scripts/policy_kl`: the trained policy against itself is exactly 0; against its start (the
  run's init) it is positive, as the step's own `kl` was; a directory without a run's config is
  refused in one line."""
  from scripts.policy_kl import held_out_kl, main
  _, root = grpo_straight
  run = str(root / "straight")
  same = held_out_kl(run, 12, samples=2, reference=run)
  assert abs(same["kl"]) < 1e-6 and abs(same["kl_k1"]) < 1e-5, same
  moved = held_out_kl(run, 12, samples=2)
  assert moved["reference"] == str(root / "base") and moved["prompts"] == 16
  assert moved["kl"] > 1e-3 and moved["kl_sequence"] > 0 and 0 <= moved["accuracy"] <= 1, moved
  assert main(["--workdir", str(root / "base")]) == 2
  assert ("has no config.json; pass the --workdir of a GRPO, DPO or PPO run"
          in capsys.readouterr().err)
