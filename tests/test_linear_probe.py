"""The linear-probe baseline (research/linear_probe.py, scripts/probe_reward.py)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from research import linear_probe as lp
from research.errors import ConfigError


def _synthetic(n=400, f=10, signal=1.0, seed=0):
  """Two responses per record, each with features N(0, 1); the preferred one (put first) is drawn
  from a Bradley-Terry model with scores `signal * w_true . x` (signal 0: a coin flip)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 2, f))
  w_true = rng.normal(size=f) / np.sqrt(f)
  s = signal * x @ w_true
  first_wins = rng.random(n) < 1 / (1 + np.exp(-(s[:, 0] - s[:, 1]) * 3))
  ordered = np.where(first_wins[:, None, None], x, x[:, ::-1])
  return ordered, np.ones((n, 2), bool), w_true


def test_nested_cv_reaches_the_true_heads_accuracy_and_chance_on_noise():
  x, valid, w_true = _synthetic()
  true_margin = (x[:, 0] - x[:, 1]) @ w_true
  bayes = np.mean(true_margin > 0)  # the accuracy of the generating head itself
  result = lp.nested_cv(x, valid, folds=5)
  assert result.pairs == 400 and len(result.l2) == 5
  assert bayes - 0.05 <= result.accuracy <= bayes + 0.03, (result, bayes)
  assert result.accuracy > 0.75 and result.log_loss < np.log(2)
  noise = lp.nested_cv(*_synthetic(signal=0.0)[:2], folds=5)
  assert abs(noise.accuracy - 0.5) < 3 * noise.standard_error, noise
  # Noise is best fit by the strongest L2s of the grid (a head near zero), signal by weaker ones.
  assert min(noise.l2) >= sorted(lp.L2_GRID)[-2] > max(result.l2), (noise.l2, result.l2)


def test_features_are_standardised_so_units_do_not_matter():
  x, valid, _ = _synthetic(seed=1)
  scaled = x * np.array([1000.0] + [1.0] * 9)  # one feature in other units
  a, b = lp.nested_cv(x, valid, folds=4), lp.nested_cv(scaled, valid, folds=4)
  assert a.l2 == b.l2 and abs(a.accuracy - b.accuracy) <= 1 / a.pairs


def test_fit_bradley_terry_matches_a_numpy_gradient_descent():
  x, valid, _ = _synthetic(n=100, f=4, seed=2)
  d = lp.pair_differences(x, valid)
  w = lp.fit_bradley_terry(d, l2=0.1)
  v = np.zeros(4)
  for _ in range(4000):
    v -= 0.5 * (-(d.T @ (1 / (1 + np.exp(d @ v)))) / len(d) + 0.1 * v)
  np.testing.assert_allclose(w, v, atol=1e-4)


def test_pairs_skip_missing_responses_and_folds_partition():
  x = np.arange(2 * 3 * 1, dtype=float).reshape(2, 3, 1)
  valid = np.array([[True, True, True], [True, True, False]])
  np.testing.assert_array_equal(lp.pair_differences(x, valid)[:, 0], [-1, -2, -1, -1])
  parts = lp.fold_records(np.arange(10), 3, seed=0)
  assert sorted(np.concatenate(parts).tolist()) == list(range(10))
  with pytest.raises(ConfigError, match="11 folds over 10 records"):
    lp.fold_records(np.arange(10), 11, seed=0)


def test_length_baseline_counts_ties_as_half():
  from scripts.probe_reward import length_baseline
  lengths = np.array([[1, 2], [3, 3], [5, 4]])
  assert length_baseline(lengths, np.ones((3, 2), bool), np.arange(3)) == 0.5


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
  """(HF dir of a tiny GGUF-imported model with a ChatML template, 60 pairs whose preferred
  answer is polite and longer)."""
  from gguf_files import write_gguf
  from research.interop.gguf_import import gguf_to_hf_dir
  tmp = tmp_path_factory.mktemp("probe")
  hf_dir = gguf_to_hf_dir(write_gguf(tmp / "m.gguf", seed=4), tmp / "hf")
  rng = np.random.default_rng(0)
  path = tmp / "pairs.jsonl"
  with open(path, "w") as f:
    for i in range(60):
      topic = ["the tin", "a he", "the sun", "my cat"][rng.integers(4)]
      good, bad = f"gladly, a kind word on {topic}", f"no, {topic} is bad"
      f.write(json.dumps({"prompt": f"tell me of {topic} {i}", "chosen": good,
                          "rejected": bad}) + "\n")
  return hf_dir, path


def test_probe_script_on_a_tiny_model(tiny_pairs, tmp_path, capsys):
  """The script end to end on a tiny GGUF-imported model and pairs whose preferred answer is
  polite: both poolings rank nearly all held-out pairs right, and `last` is the feature the reward
  stage's score head reads (a head applied to it gives the stage's scores)."""
  from configs.reward import get_config
  from research.data import preferences as pref_data
  from research.data.tokenizer import load_tokenizer
  from research.models.peft import NO_PEFT
  from research.stages import setup
  from research.stages.reward import completion_scores
  from research.stages.reward_probe import pooled_features
  from scripts import probe_reward

  hf_dir, path = tiny_pairs
  args = [f"--config.init={hf_dir}", f"--config.data.path={path}", "--config.data.eval_count=12",
          "--config.data.chat_template=True", "--folds=4", "--every_fold",
          f"--json={tmp_path / 'p.json'}"]
  assert probe_reward.main(["--config=configs/reward.py:test"] + args) == 0
  report = json.loads((tmp_path / "p.json").read_text())
  out = capsys.readouterr().out
  assert "| length baseline |" in out and "nested k-fold" in out
  for pooling in ("last", "mean"):
    assert report[pooling]["nested_cv"]["pairs"] == 60
    assert report[pooling]["nested_cv"]["accuracy"] >= 0.9, report
    assert report[pooling]["split"]["pairs"] == 12
  assert report["length_baseline"]["all"] == 0.0  # the rejected "no, ... is bad" is shorter
  # Every fold of 12 records: fold 0 is the config's own split, and the five cover all 60.
  assert [r["held_out"] for r in report["every_fold"]] == [12] * 5
  assert report["every_fold"][0]["last"] == report["last"]["split"]
  assert "| eval_fold | held out |" in out

  config = get_config("test")
  cfg, params, tok_dir = setup.load_init_weights(str(hf_dir), setup.mesh_from(config),
                                                 setup.rules_from(config))
  tok = load_tokenizer(tok_dir)
  records = pref_data.chat_records(pref_data.read_preference_records(str(path))[:5], tok)
  rows, _ = pref_data.tokenize_preferences(records, tok, config.data.max_len,
                                           config.data.long_prompts)
  features = pooled_features(params, cfg, rows, batch_size=4, log=None)
  kernel = np.random.default_rng(1).normal(size=(cfg.hidden_size, 1)).astype(np.float32)
  with_head = {**params, "score": {"dense": {"kernel": jnp.asarray(kernel)}}}
  scores = completion_scores(with_head, cfg, NO_PEFT, {k: jnp.asarray(v) for k, v in rows.items()})
  np.testing.assert_allclose(features["last"] @ kernel[:, 0], np.asarray(scores), atol=1e-4)
  with pytest.raises(SystemExit):
    probe_reward.main(["--config=configs/reward.py:test", "--bogus=1"])


def test_reward_head_init_probe_starts_where_the_probe_ranks(tiny_pairs, tmp_path):
  """head_init="probe": the reward stage's step-0 held-out accuracy is the probe's own on the same
  split (the head is the probe's `last` fit on the training pairs), far above a random head's."""
  from configs.reward import get_config
  from research.stages import reward
  from research.train.metrics import read_metrics
  from scripts import probe_reward
  hf_dir, path = tiny_pairs

  def config(head_init):
    c = get_config("test")
    c.update(init=str(hf_dir), head_init=head_init)
    c.data.update(path=str(path), eval_count=12, chat_template=True)
    c.train.update(steps=1, eval_every=1, max_eval_batches=4, checkpoint_every=0)
    c.optimizer.warmup_steps = 0
    return c

  expected = probe_reward.probe(config("probe"), folds=4, log=None)["last"]["split"]
  first_eval = {}
  for head_init in ("probe", "random"):
    reward.run(config(head_init), str(tmp_path / head_init))
    first_eval[head_init] = next(m for m in read_metrics(tmp_path / head_init)
                                 if "eval/accuracy" in m)
  assert first_eval["probe"]["step"] == 0 and first_eval["probe"]["eval/pairs"] == 12
  assert first_eval["probe"]["eval/accuracy"] == pytest.approx(expected["accuracy"])
  assert first_eval["probe"]["eval/accuracy"] >= 0.9 > first_eval["random"]["eval/accuracy"]
  with pytest.raises(ConfigError, match="head_init='bogus'"):
    reward.run(config("bogus"), str(tmp_path / "bogus"))
