"""The distillation stage on tiny models: a fresh smaller student's KL to a teacher that memorised
a small corpus falls by a stated factor; stop-and-resume equals the straight run; export."""

import numpy as np
import pytest

from research.errors import ConfigError
from research.train.metrics import read_metrics

SENTENCES = ["the cat sat on the mat.", "a dog ran in the park.", "we eat rice at noon.",
             "she reads a book at night.", "rain fell on the old roof."]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
  """A teacher pretrained (60 steps) on a memorisable corpus, then 30 distillation steps."""
  import json
  from configs.distill import get_config
  from configs.pretrain import get_config as pretrain_config
  from research.stages import distill, pretrain
  tmp = tmp_path_factory.mktemp("distill")
  corpus = tmp / "corpus.jsonl"
  with open(corpus, "w") as f:
    for i in range(200):
      f.write(json.dumps({"text": SENTENCES[i % 5]}) + "\n")
  t = pretrain_config("test")
  t.data.update(corpus=str(corpus), vocab_size=300, seq_len=32, eval_fraction=0.05)
  t.train.update(steps=60, eval_every=0, checkpoint_every=60, sample_prompts=())
  pretrain.run(t, str(tmp / "teacher"))
  c = get_config("test")
  c.teacher = str(tmp / "teacher")
  c.data.corpus = str(corpus)
  out = distill.run(c, str(tmp / "student"))
  return out, tmp, c


def test_student_kl_to_the_teacher_falls(distilled):
  """Held-out KL(teacher || student) per token falls at least 5x in 30 steps from a fresh student
  half the teacher's width (seen: 4.30 -> 0.31, 14x)."""
  out, tmp, _ = distilled
  assert out["model_config"].hidden_size * 2 == out["teacher_config"].hidden_size
  evals = {m["step"]: m for m in read_metrics(tmp / "student") if "eval/divergence" in m}
  assert evals[30]["eval/divergence"] * 5 <= evals[0]["eval/divergence"], evals
  train = [m for m in read_metrics(tmp / "student") if "train/distill/divergence" in m]
  assert train[-1]["train/distill/divergence"] < train[0]["train/distill/divergence"]


def test_distill_resumes_exactly_and_exports(distilled, tmp_path):
  from research.stages import distill
  from scripts import convert
  out, tmp, c = distilled
  straight = {m["step"]: m for m in read_metrics(tmp / "student") if "train/loss" in m}
  c = c.copy_and_resolve_references()
  c.train.update(eval_every=0, log_every=1, checkpoint_every=2, stop_at_step=2)
  distill.run(c, str(tmp_path / "run"))
  c.train.update(stop_at_step=4)
  distill.run(c, str(tmp_path / "run"), resume=True)
  resumed = {m["step"]: m for m in read_metrics(tmp_path / "run") if "train/loss" in m}
  for step in (3, 4):
    for key in ("train/loss", "train/grad_norm"):
      np.testing.assert_allclose(resumed[step][key], straight[step][key], rtol=1e-5,
                                 err_msg=f"{key} at step {step}")
  assert convert.main(["to-hf", str(tmp / "student"), str(tmp_path / "hf")]) == 0
  assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_bad_settings_are_one_line_errors():
  from configs.distill import get_config
  from research.models.peft import NO_PEFT
  from research.stages import distill
  s = get_config("test").distill
  for field, value, needle in (("divergence", "tv", "distill.divergence='tv'"),
                               ("temperature", 0.0, "temperature=0.0"),
                               ("lm_weight", -1.0, "lm_weight=-1.0")):
    bad = s.copy_and_resolve_references()
    bad[field] = value
    with pytest.raises(ConfigError, match=needle):
      distill.check_settings(bad, NO_PEFT)
  assert distill.divergence_beta(s) == 0.0
