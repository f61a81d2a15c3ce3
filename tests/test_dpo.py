"""The DPO stage on tiny models: it learns the polite-vs-rude preference (pairs, K-wise rankings
and hh-rlhf dialogues in one file), a precomputed reference equals a live frozen one, LoRA's
adapter-off reference, stop-and-resume equals the straight run, and the run exports to HF."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.errors import ConfigError
from research.train.metrics import read_metrics

TOPICS = ["the weather", "my code", "a recipe", "the news", "a poem", "the garden", "music"]


def _write_preferences(path, n=120):
  """Polite answers ranked above rude ones, in all three record forms the reader knows."""
  rng = np.random.default_rng(0)
  with open(path, "w") as f:
    for i in range(n):
      topic = TOPICS[rng.integers(len(TOPICS))]
      polite, rude = f" Gladly, a kind note on {topic}.", f" No. Go away, {topic} is dumb."
      if i % 6 == 0:  # K-wise: best first
        record = {"prompt": f"Tell me about {topic} ({i}).",
                  "responses": [polite, f" Hm, {topic}.", rude]}
      elif i % 6 == 1:  # hh-rlhf dialogue pair
        prompt = f"\n\nHuman: Tell me about {topic} ({i}).\n\nAssistant:"
        record = {"chosen": prompt + polite, "rejected": prompt + rude}
      else:
        record = {"prompt": f"Tell me about {topic} ({i}).", "chosen": polite, "rejected": rude}
      f.write(json.dumps(record) + "\n")
  return path


def _config(data, **dpo):
  from configs.dpo import get_config
  c = get_config("test")
  c.data.update(path=str(data), eval_count=24)
  c.train.update(max_eval_batches=3)
  c.dpo.update(**dpo)
  return c


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
  """The `test` preset once: its own base (10 steps on every completion), then 20 DPO steps."""
  from research.stages import dpo
  tmp = tmp_path_factory.mktemp("dpo")
  data = _write_preferences(tmp / "prefs.jsonl")
  out = dpo.run(_config(data), str(tmp / "run"))
  return out, tmp


def test_dpo_learns_the_preference_and_logs_trl_metrics(learned):
  """Held-out accuracy (chosen's implicit reward above rejected's, over all pairs) goes from 0
  (policy = reference: every reward is 0) to >= 0.9 in 20 steps, the margin grows."""
  out, tmp = learned
  assert out["reference"] == "precomputed"
  evals = {m["step"]: m for m in read_metrics(tmp / "run") if "eval/rewards/accuracies" in m}
  assert evals[0]["eval/rewards/accuracies"] == 0.0
  assert evals[0]["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-5)
  assert evals[20]["eval/rewards/accuracies"] >= 0.9, evals
  assert evals[20]["eval/rewards/margins"] > 0.5
  assert evals[20]["eval/loss"] < evals[0]["eval/loss"]
  # 24 held-out records: K-wise ones add 3 pairs, the others 1.
  assert evals[20]["eval/pairs"] > 24
  train = [m for m in read_metrics(tmp / "run") if "train/rewards/chosen" in m][-1]
  for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected"):
    assert np.isfinite(train[f"train/{key}"]) and np.isfinite(evals[20][f"eval/{key}"]), key
  assert (tmp / "run" / "reference_logps.npz").is_file()


def test_prompt_tokens_never_count():
  """Both completions of a prompt in one [B*K] forward, with the head chunked: each sum covers
  exactly the response tokens and the EOS (a hand sum over a forward of that row alone)."""
  import flax.linen as nn
  from research.models.config import ModelConfig
  from research.models.decoder import Decoder
  from research.models.peft import NO_PEFT
  from research.stages.dpo import completion_logps
  cfg = ModelConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, loss_chunk_tokens=4)
  params = nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(0),
                                           jnp.zeros((1, 8), jnp.int32))["params"])
  tokens = np.array([[[5, 6, 7, 8, 9, 2, 0, 0], [5, 6, 7, 10, 2, 0, 0, 0]]], np.int32)
  lengths = np.array([6, 5])
  seg = (np.arange(8) < lengths[:, None])[None].astype(np.int32)
  resp = np.zeros((1, 2, 8), np.float32)
  resp[0, 0, 3:6], resp[0, 1, 3:5] = 1, 1  # a 3-token prompt
  batch = {"tokens_bkt": tokens, "segment_ids_bkt": seg, "positions_bkt": np.cumsum(seg, -1) - 1,
           "response_mask_bkt": resp}
  logps, counts = jax.jit(lambda p, b: completion_logps(p, cfg, NO_PEFT, b))(params, batch)
  np.testing.assert_array_equal(counts, [[3, 2]])
  logits = jax.jit(lambda p, t: Decoder(cfg).apply({"params": p}, t)[0])(params, tokens[0])
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  for k, n in enumerate(lengths):  # padding after the row's end cannot reach it (causal)
    hand = sum(logp[k, t - 1, tokens[0, k, t]] for t in range(3, n))
    np.testing.assert_allclose(logps[0, k], hand, rtol=1e-5)


def test_precomputed_reference_equals_a_live_frozen_copy_and_resumes(learned, tmp_path):
  """Full fine-tune from the fixture's base and config: a frozen copy of the reference in the
  state logs what the precomputed reference logged at steps 1-3; the precomputed run stopped at
  step 2 and resumed (reference log-probs read back from the workdir) logs steps 3-4 as the
  straight run did."""
  from research.stages import dpo
  _, tmp = learned
  straight = {m["step"]: m for m in read_metrics(tmp / "run") if "train/loss" in m}

  def run(name, precompute, stop, resume=False):
    c = _config(tmp / "prefs.jsonl", precompute_reference=precompute)
    c.init = str(tmp / "run" / "base")
    c.train.update(eval_every=0, log_every=1, checkpoint_every=2, stop_at_step=stop)
    out = dpo.run(c, str(tmp_path / name), resume=resume)
    return out, {m["step"]: m for m in read_metrics(tmp_path / name) if "train/loss" in m}

  out, live = run("live", False, stop=3)
  assert out["reference"] == "copy" and "reference" in out["state"].frozen
  assert sorted(live) == [1, 2, 3]
  keys = ("train/loss", "train/rewards/margins", "train/logps/chosen", "train/grad_norm")
  for step in live:
    for key in keys:
      np.testing.assert_allclose(live[step][key], straight[step][key], rtol=1e-4, atol=1e-5,
                                 err_msg=f"{key} at step {step}")
  _, stopped = run("stopped", True, stop=2)
  assert max(stopped) == 2
  _, resumed = run("stopped", True, stop=4, resume=True)
  for step in (3, 4):
    for key in keys:
      np.testing.assert_allclose(resumed[step][key], straight[step][key], rtol=1e-5,
                                 err_msg=f"{key} at step {step}")


def test_lora_reference_is_the_base_with_the_adapter_off(learned, tmp_path):
  """LoRA with the reference live: the frozen base with the adapter off (no copy). B starts at
  zero, so at step 1 the policy is the reference: every implicit reward is 0 and each pair's
  loss is log 2. The run exports as a PEFT adapter; the full run of the fixture as HF weights."""
  from research.stages import dpo
  from scripts import convert
  _, tmp = learned
  c = _config(tmp / "prefs.jsonl", precompute_reference=False)
  c.init = str(tmp / "run" / "base")
  c.peft.update(method="lora", r=4, alpha=8.0, targets=("q", "v"))
  c.train.update(steps=2, stop_at_step=1, eval_every=0, log_every=1)
  out = dpo.run(c, str(tmp_path / "lora"))
  assert out["reference"] == "adapter_off" and "reference" not in out["state"].frozen
  first = [m for m in read_metrics(tmp_path / "lora") if "train/loss" in m][0]
  assert first["train/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
  assert first["train/loss"] == pytest.approx(np.log(2.0), rel=1e-5)
  assert convert.main(["to-peft", str(tmp_path / "lora"), str(tmp_path / "adapter")]) == 0
  assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
  assert convert.main(["to-hf", str(tmp / "run"), str(tmp_path / "hf")]) == 0
  assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_bad_settings_are_one_line_errors(tmp_path):
  from configs.dpo import get_config
  from research.sweeps import stage_module
  from research.stages import dpo
  from research.models.peft import NO_PEFT
  assert stage_module(get_config("test")) == "experiments.dpo"
  c = get_config("test")
  for field, value, needle in (("loss", "kto", "dpo.loss='kto'"), ("beta", 0.0, "dpo.beta=0.0"),
                               ("label_smoothing", 0.5, "label_smoothing=0.5")):
    s = c.dpo.copy_and_resolve_references()
    s[field] = value
    with pytest.raises(ConfigError, match=needle):
      dpo.check_settings(s, NO_PEFT)
  s = c.dpo.copy_and_resolve_references()
  s.update(loss="ipo", label_smoothing=0.1)
  with pytest.raises(ConfigError, match="sigmoid and simpo"):
    dpo.check_settings(s, NO_PEFT)
  assert dpo.reference_kind("simpo", NO_PEFT, True) == "none"


def test_score_answers_helpers():
  from scripts.score_answers import compare, cut_at
  assert cut_at(" Sure.\n\nHuman: more", "\n\nHuman:") == " Sure." and cut_at("a", "") == "a"
  got = compare(before=[0.0, 1.0, 2.0, 1.0], after=[1.0, 1.0, 4.0, 0.0],
                len_before=[10, 10, 10, 10], len_after=[10, 12, 30, 9], length_tolerance=0.2)
  std = np.std([0.0, 1.0, 2.0, 1.0], ddof=1)
  assert got["score_before"] == 1.0 and got["score_after"] == 1.5 and got["gain"] == 0.5
  assert got["gain_in_std"] == pytest.approx(0.5 / std)
  assert got["win_rate"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)  # a tie counts half
  # 10 vs 30 characters is not matched; the others are (12 - 10 <= 0.2 * 12).
  assert got["matched_pairs"] == 3 and got["gain_matched"] == pytest.approx((1 + 0 - 1) / 3)
  assert got["length_before"] == 10 and got["length_after"] == pytest.approx(61 / 4)


def test_a_reward_model_scores_the_dpo_policy_above_its_reference(learned, tmp_path, capsys):
  """`scripts/score_answers`: a reward model trained on the same polite-vs-rude pairs scores the
  DPO policy's greedy answers to the held-out prompts above its reference's (the base the run
  started from), on average and on most prompts."""
  from configs.reward import get_config
  from research.stages import reward
  from scripts.score_answers import main, score_answers
  _, tmp = learned
  c = get_config("test")
  c.init = str(tmp / "run" / "base")
  c.data.update(path=str(tmp / "prefs.jsonl"), eval_count=24)
  c.train.update(steps=20, eval_every=0)
  reward.run(c, str(tmp_path / "rm"))
  summary, rows = score_answers(str(tmp / "run"), str(tmp_path / "rm"),
                                reference=str(tmp / "run" / "base"), max_new_tokens=12)
  assert summary["prompts"] == len(rows) == 24
  assert summary["gain"] > 0 and summary["win_rate"] > 0.5, summary
  assert any("Gladly" in r["after"] for r in rows), rows[:3]
  # Sampled, two answers per prompt, each its own draw; the trained preference still shows.
  sampled, rows2 = score_answers(str(tmp / "run"), str(tmp_path / "rm"),
                                 reference=str(tmp / "run" / "base"), max_new_tokens=12,
                                 temperature=1.0, samples=2, judge_prompt="seen")
  assert sampled["prompts"] == 24 and len(rows2) == 48 and sampled["samples"] == 2
  assert [r["prompt"] for r in rows2[:24]] == [r["prompt"] for r in rows2[24:]]
  # "seen": the judge reads the prompt the policy answered, decoded from its (cut) token ids.
  assert all(r["prompt"] and full["prompt"].endswith(r["prompt"])
             for r, full in zip(rows2, rows)), [(r["prompt"], f["prompt"]) for r, f in
                                                zip(rows2[:2], rows)]
  assert [r["after"] for r in rows2[:24]] != [r["after"] for r in rows2[24:]]
  assert sampled["gain"] > 0, sampled
  assert main(["--workdir", str(tmp / "run"), "--reward_model", str(tmp_path / "rm"),
               "--samples=2"]) == 2
  assert "several samples per prompt need a temperature > 0" in capsys.readouterr().err
  # The run built its own base (init=''): the reference must be named.
  assert main(["--workdir", str(tmp / "run"), "--reward_model", str(tmp_path / "rm")]) == 2
  assert "name the reference weights (--reference=DIR)" in capsys.readouterr().err
