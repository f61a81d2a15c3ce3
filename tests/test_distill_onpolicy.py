"""On-policy distillation (GKD's lmbda) on tiny models: the rows an on-policy step trains on are
the student's own samples (greedy here, so they equal `greedy_generate`), the loss on the sampled
tokens only; a fully on-policy run cuts the held-out divergence; stop-and-resume equals the
straight run at lmbda 0.5; on-policy on a corpus is a one-line error."""

import json
import os
import pathlib
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.errors import ConfigError
from research.models.config import ModelConfig
from research.data.packing import empty_rows
from research.models.decoder import Decoder
from research.sampling import SamplingConfig, greedy_generate
from research.stages import distill_onpolicy as onpolicy
from research.train.metrics import read_metrics

CFG = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64)
FACTS = [("apple", "red"), ("banana", "yellow"), ("grass", "green"), ("sky", "blue"),
         ("snow", "white"), ("coal", "black"), ("plum", "purple"), ("lemon", "yellow"),
         ("cherry", "red"), ("ocean", "blue"), ("leaf", "green"), ("milk", "white")]
QUESTIONS = ["What color is the {t}?", "Name the color of the {t}.", "The {t} has which color?",
             "Colour of the {t}?"]


def test_an_on_policy_step_trains_on_the_students_greedy_samples():
  """The batch the jitted step receives: prompt left of column P, then the student's greedy
  continuation (equal to `greedy_generate`, stop token included), the loss on it alone; an
  off-policy step passes the data's batch unchanged, or with seq_kd the teacher's samples."""
  params = nn.meta.unbox(Decoder(CFG).init(jax.random.PRNGKey(1),
                                           jnp.zeros((1, 4), jnp.int32))["params"])
  seq_len, n, pad = 16, 6, 0
  rng = np.random.default_rng(0)
  prompts = [rng.integers(4, 50, size=k).astype(np.int32) for k in (3, 9, 14)]
  width = seq_len + 1 - n
  kept = [p[-width:].tolist() for p in prompts]  # what the step samples from: cut from the left
  # A stop token the student really emits: row 0's third greedy token, so some rows stop early.
  eos = greedy_generate(params, CFG, kept, n, pad)[0][2]
  examples = [(np.concatenate([p, [7, 8, eos]]).astype(np.int32),
               np.array([False] * len(p) + [True] * 3)) for p in prompts]
  columns = onpolicy.prompt_columns(examples, pad, width)
  assert columns["prompt_tokens"].shape == (3, width)
  np.testing.assert_array_equal(columns["prompt_tokens"][2], prompts[2][-width:])  # cut left
  data = {k: np.full_like(v, 5) for k, v in empty_rows(3, seq_len).items()}
  data["lm_mask"] = data["loss_mask"].copy()
  batch = {**data, **columns}
  seen = []

  def spy_step(state, b):
    seen.append(jax.device_get(b))
    return state, {"loss": jnp.float32(0.0)}

  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  student = onpolicy.Sampler(params=lambda st: st.params, cfg=CFG)
  step = onpolicy.make_host_step(spy_step, sharding, np.array([True, False]), student, None,
                                 SamplingConfig(max_new_tokens=n, stop_tokens=(eos,)), pad)
  state = types.SimpleNamespace(params=params, frozen={}, step=jnp.int32(0),
                                rng=jax.random.PRNGKey(0))
  _, on = step(state, batch)
  _, off = step(state, batch)
  assert (on["distill/on_policy"], off["distill/on_policy"]) == (1.0, 0.0)
  assert off["distill/on_policy_fraction"] == 0.5 and "distill/generated_length" not in off
  for k, v in data.items():
    np.testing.assert_array_equal(seen[1][k], v, err_msg=k)

  rows = seen[0]
  greedy = greedy_generate(params, CFG, kept, n, pad, eos)
  assert any(len(g) < n for g in greedy) and greedy[0][-1] == eos
  assert float(on["distill/generated_length"]) == pytest.approx(np.mean([len(g) for g in greedy]))
  for k, v in data.items():
    assert (rows[k].shape, rows[k].dtype) == (v.shape, v.dtype), k
  assert not rows["lm_mask"].any()  # lm_weight's NLL never trains on the student's own samples
  for b, (prompt, sample) in enumerate(zip(kept, greedy)):
    real = rows["segment_ids"][b] > 0
    np.testing.assert_array_equal(rows["inputs"][b][real][:len(prompt)], prompt)
    np.testing.assert_array_equal(rows["targets"][b][rows["loss_mask"][b] > 0], sample)
    # The loss starts where the prompt's last token predicts the first sampled one.
    assert np.flatnonzero(rows["loss_mask"][b])[0] == width - 1
    np.testing.assert_array_equal(rows["positions"][b][real], np.arange(real.sum()))

  # seq_kd: an off-policy step's responses are the teacher's greedy samples instead.
  teacher_params = nn.meta.unbox(Decoder(CFG).init(jax.random.PRNGKey(2),
                                                   jnp.zeros((1, 4), jnp.int32))["params"])
  teacher = onpolicy.Sampler(params=lambda st: st.frozen["teacher"], cfg=CFG)
  step = onpolicy.make_host_step(spy_step, sharding, np.array([False]), student, teacher,
                                 SamplingConfig(max_new_tokens=n, stop_tokens=(eos,)), pad)
  _, metrics = step(types.SimpleNamespace(params=params, frozen={"teacher": teacher_params},
                                          step=jnp.int32(0), rng=jax.random.PRNGKey(0)), batch)
  assert metrics["distill/on_policy"] == 0.0
  by_teacher = greedy_generate(teacher_params, CFG, kept, n, pad, eos)
  assert by_teacher != greedy
  for b, sample in enumerate(by_teacher):
    np.testing.assert_array_equal(seen[2]["targets"][b][seen[2]["loss_mask"][b] > 0], sample)


def test_on_policy_schedule_is_a_function_of_seed_and_step():
  a = onpolicy.on_policy_schedule(0, 1000, 0.3)
  np.testing.assert_array_equal(a[:10], onpolicy.on_policy_schedule(0, 10, 0.3))
  assert 0.25 < a.mean() < 0.35
  assert not onpolicy.on_policy_schedule(0, 50, 0.0).any()
  assert onpolicy.on_policy_schedule(0, 50, 1.0).all()


def _plain(question: str, answer: str) -> str:
  return f"<|user|>\n{question}\n<|assistant|>\n{answer}"


@pytest.fixture(scope="module")
def onpolicy_run(tmp_path_factory):
  """A teacher pretrained on the facts in the plain chat template, then a fresh student half
  its width distilled fully on-policy (lmbda 1) from the same records in SFT form."""
  from configs.distill import get_config
  from configs.pretrain import get_config as pretrain_config
  from research.stages import distill, pretrain
  tmp = tmp_path_factory.mktemp("onpolicy")
  pairs = [(q.format(t=t), f"The {t} is {c}.") for t, c in FACTS for q in QUESTIONS]
  corpus, records = tmp / "corpus.jsonl", tmp / "sft.jsonl"
  with open(corpus, "w") as f:
    for i in range(4):
      for q, a in pairs:
        f.write(json.dumps({"text": _plain(q, a)}) + "\n")
  with open(records, "w") as f:
    for q, a in pairs:
      f.write(json.dumps({"instruction": q, "input": "", "output": a}) + "\n")
  t = pretrain_config("test")
  t.data.update(corpus=str(corpus), vocab_size=300, seq_len=32, eval_fraction=0.05)
  t.train.update(steps=60, eval_every=0, checkpoint_every=60, sample_prompts=())
  pretrain.run(t, str(tmp / "teacher"))
  c = get_config("test")
  c.teacher = str(tmp / "teacher")
  c.data.update(format="sft", path=str(records), eval_fraction=0.15)
  c.distill.update(lmbda=1.0, max_new_tokens=12)
  out = distill.run(c, str(tmp / "student"))
  return out, tmp, c


def test_fully_on_policy_student_divergence_falls(onpolicy_run):
  """Every step trains on the student's samples; the held-out divergence (on the records'
  responses) falls at least 2x in 30 steps (seen: 2.43 -> 0.78, 3.1x)."""
  _, tmp, _ = onpolicy_run
  metrics = read_metrics(tmp / "student")
  train = [m for m in metrics if "train/distill/on_policy" in m]
  assert len(train) == 30 and all(m["train/distill/on_policy"] == 1.0 for m in train)
  assert all(1 <= m["train/distill/generated_length"] <= 12 for m in train)
  evals = {m["step"]: m for m in metrics if "eval/divergence" in m}
  assert evals[30]["eval/divergence"] * 2 <= evals[0]["eval/divergence"], evals


def test_half_on_policy_resumes_exactly(onpolicy_run, tmp_path):
  from research.stages import distill
  _, _, c = onpolicy_run
  c = c.copy_and_resolve_references()
  c.distill.lmbda = 0.5
  c.mesh.update(data=2, fsdp=2, tensor=2)  # the sampler then runs on sharded weights too
  c.train.update(steps=4, eval_every=0, log_every=1, checkpoint_every=2)
  schedule = onpolicy.on_policy_schedule(c.seed, 4, 0.5)
  assert schedule[2:].any() and not schedule[2:].all(), schedule  # both kinds after the stop
  distill.run(c, str(tmp_path / "straight"))
  c.train.stop_at_step = 2
  distill.run(c, str(tmp_path / "run"))
  c.train.stop_at_step = 0
  distill.run(c, str(tmp_path / "run"), resume=True)
  straight, resumed = ({m["step"]: m for m in read_metrics(tmp_path / d) if "train/loss" in m}
                       for d in ("straight", "run"))
  for step in (1, 2, 3, 4):
    assert resumed[step]["train/distill/on_policy"] == float(schedule[step - 1])
    for key in ("train/loss", "train/grad_norm"):
      np.testing.assert_allclose(resumed[step][key], straight[step][key], rtol=1e-5,
                                 err_msg=f"{key} at step {step}")


def test_on_policy_needs_prompts_and_sane_sampling(tmp_path):
  from configs.distill import get_config
  from research.stages import distill
  c = get_config("test")
  c.distill.lmbda = 0.5
  with pytest.raises(ConfigError, match=r"distill.lmbda=0.5 .* data.format='sft'"):
    distill.run(c, str(tmp_path / "corpus"))
  c.data.format = "sft"
  for field, value, needle in (("lmbda", 1.5, "distill.lmbda=1.5"),
                               ("max_new_tokens", 32, "distill.max_new_tokens=32"),
                               ("sample_temperature", -1.0, "distill.sample_temperature=-1.0"),
                               ("top_p", 0.0, "distill.top_p=0.0")):
    bad = c.distill.copy_and_resolve_references()
    bad[field] = value
    with pytest.raises(ConfigError, match=needle):
      onpolicy.check_sampling(bad, c.data)
  preset = get_config("huanhuan_onpolicy")
  onpolicy.check_sampling(preset.distill, preset.data)


def test_cli_on_policy_on_a_corpus_is_one_error_line(tmp_path):
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.distill", "--config=configs/distill.py:test",
       f"--workdir={tmp_path / 'run'}", "--config.distill.lmbda=0.5"],
      cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "distill.lmbda=0.5" in errors[0], proc.stderr


def test_lora_student_samples_on_policy(onpolicy_run, tmp_path):
  """A LoRA student (the teacher's weights plus adapters) samples with its adapters applied."""
  from research.stages import distill
  _, tmp, c = onpolicy_run
  c = c.copy_and_resolve_references()
  c.init = str(tmp / "teacher")
  c.peft.update(method="lora", r=4, alpha=8.0, targets=("q", "v"))
  c.train.update(steps=2, eval_every=0, log_every=1, checkpoint_every=2)
  distill.run(c, str(tmp_path / "lora"))
  train = [m for m in read_metrics(tmp_path / "lora") if "train/distill/on_policy" in m]
  assert [m["train/distill/on_policy"] for m in train] == [1.0, 1.0]
  assert all(np.isfinite(m["train/loss"]) and m["train/distill/generated_length"] >= 1
             for m in train)
