"""Reward model and PPO on tiny models: the score index, the rollout's log-probs, a reward model
that learns, PPO raising the word-list reward, and the tokenizer check."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.errors import ConfigError
from research.models.config import ModelConfig
from research.models.decoder import Decoder
from research.models.heads import SCORE_HEAD, VALUE_HEAD, apply_with_head, init_with_head
from research.models.peft import NO_PEFT
from research.objectives.lm import token_nll
from research.sampling import SamplingConfig, left_pad
from research.stages.ppo import same_tokenizer
from research.stages.ppo_step import PPOModels, PPOSettings, rollout
from research.train.state import TrainState

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
CFG = ModelConfig(vocab_size=48, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64)


def _state():
  unbox = nn.meta.unbox
  policy = unbox(Decoder(CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
  ref = unbox(Decoder(CFG).init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32))["params"])
  value = unbox(init_with_head(CFG, NO_PEFT, VALUE_HEAD, jax.random.PRNGKey(2)))
  rm = unbox(init_with_head(CFG, NO_PEFT, SCORE_HEAD, jax.random.PRNGKey(3)))
  return TrainState(step=jnp.zeros((), jnp.int32), params={"policy": policy, "value": value},
                    frozen={"policy": {}, "value": {}, "ref": ref, "reward": rm,
                            "kl_coef": jnp.float32(0.1)},
                    opt_state=None, rng=jax.random.PRNGKey(0))


def test_rollout_scores_logprobs_and_kl_at_the_right_tokens():
  """Left-padded prompts of different lengths, rows that stop early: every per-row quantity equals
  a forward pass over that row alone, without padding; the reward model reads each response as
  the reward stage's rows end, at an EOS: its own when it stopped on it, else one appended."""
  state = _state()
  models = PPOModels(policy_cfg=CFG, peft=NO_PEFT, value_cfg=CFG, reward_cfg=CFG)
  prompts = [[7, 8, 9, 10, 11], [12], [13, 14, 15]]
  tokens, segments = left_pad(prompts, 0)
  batch = {"prompt_tokens": jnp.asarray(tokens), "prompt_segments": jnp.asarray(segments)}

  def sample(stop):
    settings = PPOSettings(sampling=SamplingConfig(max_new_tokens=6, temperature=1.0,
                                                   stop_tokens=(stop,)), pad_id=0, eos_id=stop)
    return rollout(state, batch, jax.random.PRNGKey(5), models, settings)

  # The same key draws the same tokens up to a stop, so row 0's second token as the stop token
  # ends row 0 early.
  stop = int(np.asarray(sample(47)["resp_br"])[0, 1])
  out = sample(stop)
  lengths = np.asarray(out["mask_br"]).sum(1)
  resp = np.asarray(out["resp_br"])
  assert lengths[0] <= 2 and resp[0, lengths[0] - 1] == stop, (lengths, resp)
  assert (lengths == 6).any(), lengths  # and a row cut at max_new_tokens, with no EOS of its own
  # References: each row alone, right-padded to one width (one compile per function).
  width = 12
  score_fn = jax.jit(lambda p, t, s: apply_with_head(p, CFG, SCORE_HEAD, t, s)[0])
  logits_fn = jax.jit(lambda p, t, s: Decoder(CFG).apply({"params": p}, t, s)[0])
  for i, prompt in enumerate(prompts):
    response = resp[i, :lengths[i]].tolist()
    if lengths[i] < 6:
      assert response[-1] == stop  # stopped early, on its stop token
    n, pad = len(prompt) + len(response), width - len(prompt) - len(response)
    seq = jnp.asarray([prompt + response + [0] * pad])
    seg = jnp.asarray([[1] * n + [0] * pad])
    judged = prompt + response + [stop] * (response[-1] != stop)  # the EOS the reward model reads
    score = score_fn(state.frozen["reward"], jnp.asarray([judged + [0] * (width - len(judged))]),
                     jnp.asarray([[1] * len(judged) + [0] * (width - len(judged))]))
    np.testing.assert_allclose(out["scores_b"][i], score[0, len(judged) - 1], atol=1e-5)
    for params, key in ((state.params["policy"], "logp_br"), (state.frozen["ref"], "ref_logp_br")):
      logits = logits_fn(params, seq, seg)
      logp = -token_nll(logits[:, len(prompt) - 1:n - 1], seq[:, len(prompt):n])
      np.testing.assert_allclose(out[key][i, :lengths[i]], logp[0], atol=1e-5, err_msg=key)
  kl = np.sum((np.asarray(out["logp_br"]) - np.asarray(out["ref_logp_br"])) *
              np.asarray(out["mask_br"]), axis=1)
  np.testing.assert_allclose(out["stats"]["objective/kl"], kl.mean(), rtol=1e-5)
  np.testing.assert_allclose(out["stats"]["objective/scores"], np.mean(out["scores_b"]),
                             rtol=1e-6)


def test_reward_model_tokenizer_must_match_policy(tmp_path):
  from research.data.tokenizer import train_bpe_tokenizer
  texts = ["def f(x):\n  return x + 1\n"] * 50 + ["hello world, hello there"] * 50
  a = train_bpe_tokenizer(texts, 300, str(tmp_path / "a"))
  b = train_bpe_tokenizer(texts[:50], 290, str(tmp_path / "b"))
  same_tokenizer(a, a, "same")
  with pytest.raises(ConfigError, match="tokenizer .* differs from the policy's"):
    same_tokenizer(a, b, str(tmp_path / "b"))


def test_reward_model_prompt_format_must_match_policy(tmp_path):
  """A reward model trained on chat-templated prompts refuses plain ones (and the reverse), naming
  the flag to set; a reward model whose run config says nothing about it (an older one, or none)
  is taken as plain."""
  from configs.ppo import get_config
  from research.stages.ppo import same_prompt_format
  from research.train.metrics import save_config
  config = get_config("test")
  save_config(tmp_path, {"stage": "reward", "data": {"chat_template": True}})
  with pytest.raises(ConfigError, match=r"data.chat_template=False but the reward model .* "
                     r"data.chat_template=True .*--config.data.chat_template=True"):
    same_prompt_format(config, str(tmp_path))
  config.data.chat_template = True
  same_prompt_format(config, str(tmp_path))
  save_config(tmp_path, {"stage": "reward", "data": {}})
  with pytest.raises(ConfigError, match="--config.data.chat_template=False"):
    same_prompt_format(config, str(tmp_path))


@pytest.fixture(scope="module")
def ppo_straight(tmp_path_factory):
  """The `test` preset run once from scratch: its own base (workdir/base), then 20 PPO steps."""
  from configs.ppo import get_config
  from research.stages import ppo
  workdir = tmp_path_factory.mktemp("ppo_straight")
  return ppo.run(get_config("test"), str(workdir)), workdir


def test_ppo_raises_the_word_list_reward(ppo_straight):
  """The sanity task: 20 PPO steps on a tiny code model lift the held-out reward (the fraction of
  response tokens from the word list) by at least 0.15 (seen: 0.06 -> 0.31 at 20 steps)."""
  from research.train.metrics import read_metrics
  out, workdir = ppo_straight
  evals = {m["step"]: m for m in read_metrics(workdir) if "eval/score" in m}
  assert evals[20]["eval/score"] >= evals[0]["eval/score"] + 0.15, evals
  assert evals[0]["eval/kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
  assert all(m["eval/score_std"] > 0 for m in evals.values()), evals  # 2 draws of 8 prompts
  assert out["plot"] and (workdir / "ppo_curves.png").is_file()
  train = [m for m in read_metrics(workdir) if "train/objective/kl" in m]
  for key in ("objective/entropy", "objective/rlhf_reward", "policy/approxkl_avg",
              "policy/clipfrac_avg", "val/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
              "val/explained_variance", "response_length"):
    assert f"train/{key}" in train[-1], key


def test_ppo_eval_needs_a_draw_per_prompt():
  from configs.ppo import get_config
  from research.errors import ConfigError
  from research.stages.config_ranges import check_config_ranges
  config = get_config("hh_rlhf_smollm2")
  config.data.eval_draws = 0
  with pytest.raises(ConfigError, match=r"data.eval_draws=0 is out of range: it must be >= 1"):
    check_config_ranges(config)


def test_ppo_resumed_run_matches_the_uninterrupted_one(ppo_straight, tmp_path):
  """Stopped after step 3 and resumed: the policy, value model, both optimizers, the RNG that
  drives sampling and the KL coefficient all come back, so steps 4-6 log what the straight run
  logged (the rollouts are sampled, so any lost piece of state shows up in every metric)."""
  from configs.ppo import get_config
  from research.stages import ppo
  from research.train.metrics import read_metrics
  _, straight = ppo_straight

  def train_metrics(workdir):
    return {m["step"]: m for m in read_metrics(workdir) if "train/objective/kl" in m}

  config = get_config("test")
  config.init = str(straight / "base")  # the same start, without pretraining it again
  config.ppo.update(adaptive_kl=True, kl_horizon=20.0)  # kl_coef moves and must come back too
  config.train.update(steps=6, checkpoint_every=3, eval_every=0, log_every=1)
  ppo.run(config, str(tmp_path / "straight"))
  config.train.update(stop_at_step=3)
  ppo.run(config, str(tmp_path / "stopped"))
  assert max(train_metrics(tmp_path / "stopped")) == 3
  config.train.update(stop_at_step=0)
  ppo.run(config, str(tmp_path / "stopped"), resume=True)
  ours, ref = train_metrics(tmp_path / "stopped"), train_metrics(tmp_path / "straight")
  assert sorted(ours) == sorted(ref) == list(range(1, 7))
  assert ref[6]["train/objective/kl_coef"] != pytest.approx(config.ppo.kl_coef, rel=1e-3)
  for step in (4, 5, 6):
    for key in ("train/objective/scores", "train/objective/kl", "train/loss/policy_avg",
                "train/objective/kl_coef"):
      np.testing.assert_allclose(ours[step][key], ref[step][key], rtol=1e-5,
                                 err_msg=f"{key} at step {step}")


def test_reward_model_learns_a_preference(tmp_path):
  """Pairs whose chosen answer is polite and rejected rude: held-out pair accuracy goes from about
  chance to at least 0.9 within 30 steps (its own tiny base is pretrained first)."""
  import json
  from configs.reward import get_config
  from research.stages import reward
  from research.train.metrics import read_metrics
  rng = np.random.default_rng(0)
  topics = ["the weather", "my code", "a recipe", "the news", "a poem", "the garden", "music"]
  path = tmp_path / "pairs.jsonl"
  with open(path, "w") as f:
    for i in range(160):
      topic = topics[rng.integers(len(topics))]
      f.write(json.dumps({"prompt": f"Tell me about {topic} ({i}).",
                          "chosen": f" Gladly, here is a kind note on {topic}.",
                          "rejected": f" No. Go away, {topic} is stupid."}) + "\n")
  c = get_config("test")
  c.data.update(path=str(path), eval_count=32)
  c.train.update(steps=30, eval_every=30, max_eval_batches=4)
  out = reward.run(c, str(tmp_path / "rm"))
  evals = [m for m in read_metrics(tmp_path / "rm") if "eval/accuracy" in m]
  assert evals[-1]["eval/accuracy"] >= 0.9, evals
  assert evals[-1]["eval/margin"] > evals[0]["eval/margin"]
  assert out["eval"]["eval/pairs"] == 32
  hh_rlhf = SHARED_DATA / "hh_rlhf_harmless_test_500.jsonl"  # real dialogues, when present
  _check_sequence_classifier_export(tmp_path, [path] + [hh_rlhf] * hh_rlhf.is_file())
  _check_text_scores(tmp_path / "rm", path)


def _check_text_scores(rm_dir, pairs_path):
  """The reward model as a text reward function (what GRPO and scripts/score_answers use) scores
  prompt + answer as the reward stage scored the tokenized pair, at the EOS it was trained to
  read, to 1e-5."""
  from research.data import preferences
  from research.data.tokenizer import load_tokenizer
  from research.parallel.rules import DEFAULT_RULES
  from research.stages.grpo import reward_model_function
  from research.stages.reward import completion_scores
  from research.train.workdir import load_run
  cfg, peft, params, tok_dir, _ = load_run(str(rm_dir))
  records = preferences.read_preference_records(str(pairs_path))[:6]
  arrays, report = preferences.tokenize_preferences(records, load_tokenizer(tok_dir), 64)
  assert report.truncated == 0
  ours = np.asarray(completion_scores(params, cfg, peft, {k: jnp.asarray(v) for k, v in
                                                         arrays.items()}))
  score = reward_model_function(str(rm_dir), None, DEFAULT_RULES, batch_size=4, max_len=64)
  texts = score([r["prompt"] for r in records for _ in r["responses"]],
                [x for r in records for x in r["responses"]], None)
  np.testing.assert_allclose(np.reshape(texts, ours.shape), ours, atol=1e-5)


def _check_sequence_classifier_export(tmp_path, pairs_paths):
  """`scripts/convert.py to-hf` of the reward workdir gives LlamaForSequenceClassification, which
  scores every completion (right-padded batch) of the first pairs of each file as the reward model
  does here, to 1e-4."""
  import subprocess
  import sys
  import torch
  import transformers
  from research.data import preferences
  from research.data.tokenizer import load_tokenizer
  from research.stages.reward import completion_scores
  from research.train.workdir import load_run
  out_dir = tmp_path / "rm_hf"
  subprocess.run([sys.executable, "scripts/convert.py", "to-hf", str(tmp_path / "rm"),
                  str(out_dir)], check=True, capture_output=True, timeout=300)
  cfg, peft, params, tok_dir, _ = load_run(str(tmp_path / "rm"))
  tokenizer = load_tokenizer(tok_dir)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(str(out_dir))
  assert type(model).__name__ == "LlamaForSequenceClassification"
  assert model.config.pad_token_id == tokenizer.pad_token_id
  for pairs_path in pairs_paths:
    records = preferences.read_preference_records(str(pairs_path))[:6]
    arrays, _ = preferences.tokenize_preferences(records, tokenizer, 64, "truncate")
    ours = np.asarray(completion_scores(params, cfg, peft, {k: jnp.asarray(v) for k, v in
                                                           arrays.items()}))
    tokens = torch.tensor(arrays["tokens_bkt"].reshape(-1, 64), dtype=torch.long)
    mask = torch.tensor(arrays["segment_ids_bkt"].reshape(-1, 64) > 0, dtype=torch.long)
    with torch.no_grad():
      theirs = model(input_ids=tokens, attention_mask=mask).logits[:, 0].numpy()
    np.testing.assert_allclose(theirs.reshape(ours.shape), ours, atol=1e-4, err_msg=str(pairs_path))


def test_ppo_workdir_exports_its_trained_policy(ppo_straight, tmp_path):
  """A PPO checkpoint holds policy, value model and reference; the workdir loads as its trained
  policy, exactly (what generate.py and score_answers.py read), and `convert.py to-hf` hands that
  policy to transformers: its logits equal ours."""
  import torch
  import transformers
  from research.train import workdir as wd
  from scripts import convert
  out, workdir = ppo_straight
  cfg, peft, params, tok_dir, _ = wd.load_run(str(workdir))
  assert peft.method == "none" and tok_dir
  trained = jax.device_get(out["state"].params["policy"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), trained)
  _, start, _, _ = wd.load_model(str(workdir / "base"))
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                       jax.device_get(start), trained))
  assert max(moved) > 0, "the loaded policy equals the base: PPO did not train it"
  assert convert.main(["to-hf", str(workdir), str(tmp_path / "hf")]) == 0
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
  ids = np.arange(3, 15, dtype=np.int32)[None] % cfg.vocab_size
  ours = Decoder(cfg).apply({"params": params}, jnp.asarray(ids), jnp.ones_like(ids))[0]
  with torch.no_grad():
    theirs = hf(torch.from_numpy(ids).long()).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)
