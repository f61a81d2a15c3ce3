"""The presets' data lives in the repository (data/, with licenses) and is found from any cwd (#18)."""

from __future__ import annotations

import os
import pathlib

import pytest

from configs import ppo, reward, sft

REPO = pathlib.Path(__file__).resolve().parents[1]
PRESETS = [(sft, "huanhuan_lora"), (sft, "huanhuan_full"), (sft, "huanhuan_lora_smollm2"),
           (reward, "hh_rlhf"), (reward, "hh_rlhf_smollm2"), (ppo, "hh_rlhf"),
           (ppo, "hh_rlhf_smollm2")]


@pytest.mark.parametrize("module,preset", PRESETS, ids=[f"{m.__name__}:{p}" for m, p in PRESETS])
def test_preset_data_is_in_the_repository(module, preset, monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)  # paths must not depend on the working directory
  c = module.get_config(preset)
  path = pathlib.Path(c.data.path)
  assert path.is_absolute() and path.is_file(), path
  assert path.parent == REPO / "data"
  if module is ppo:
    assert pathlib.Path(c.reward_training.data.path).is_file()


def test_data_folder_carries_its_licenses_and_sources():
  data = REPO / "data"
  readme = (data / "README.md").read_text()
  for name in ("huanhuan.json", "hh_rlhf_harmless_test_500.jsonl", "self-llm.LICENSE",
               "hh-rlhf.LICENSE"):
    assert (data / name).is_file() and name in readme
  assert "Apache License" in (data / "self-llm.LICENSE").read_text()
  assert "MIT License" in (data / "hh-rlhf.LICENSE").read_text()


def test_smollm2_presets_start_from_the_fetched_model():
  c = sft.get_config("huanhuan_lora_smollm2")
  assert c.init == "fetch:smollm2-135m-instruct"
  # The self-llm tutorial's LoRA: r=8, alpha 32, dropout 0.1, all seven projections.
  assert (c.peft.method, c.peft.r, c.peft.alpha, c.peft.dropout) == ("lora", 8, 32.0, 0.1)
  assert set(c.peft.targets) == {"q", "k", "v", "o", "gate", "up", "down"}
  assert reward.get_config("hh_rlhf_smollm2").init == c.init
  p = ppo.get_config("hh_rlhf_smollm2")
  assert p.init == c.init and p.reward_training.to_dict() == reward.get_config(
      "hh_rlhf_smollm2").to_dict()
  # The policy's prompts take the form its reward model was trained on (PPO refuses a mismatch).
  assert p.data.chat_template is True and p.reward_training.data.chat_template is True


def test_nothing_outside_tests_reads_shared_data():
  for folder in ("research", "configs", "experiments", "scripts"):
    for root, _, files in os.walk(REPO / folder):
      for name in files:
        if name.endswith(".py"):
          text = (pathlib.Path(root) / name).read_text(encoding="utf-8")
          assert "shared/data" not in text, os.path.join(root, name)
