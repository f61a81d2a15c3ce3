"""Published model configs (tests/data/hf_configs/*.json: every field as published, shapes shrunk to
hidden_size 64, 2 layers, 4 heads, head_dim 16, vocab_size 128) import, and a tiny random
transformers model built from each gives our logits. Drop a config.json there to cover a family."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from research.interop.hf_config import model_config_from_hf
from research.interop.hf_import import load_hf_checkpoint
from research.models.decoder import Decoder

transformers = pytest.importorskip("transformers")

CONFIGS = sorted((pathlib.Path(__file__).parent / "data" / "hf_configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_real_config_imports_and_matches_transformers(path, tmp_path):
  d = json.loads(path.read_text())
  cfg = model_config_from_hf(d)
  assert cfg.max_position_embeddings == d["max_position_embeddings"]
  hf_config = transformers.AutoConfig.for_model(
      d["model_type"], **{k: v for k, v in d.items() if k != "model_type"})
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():  # random norms and biases (they start at 1 and 0), larger weights
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
      else:
        p.mul_(5.0)
  model.save_pretrained(tmp_path / "hf")
  loaded, params = load_hf_checkpoint(tmp_path / "hf")
  assert loaded == cfg.replace(param_dtype=loaded.param_dtype)
  tokens = np.random.default_rng(0).integers(0, d["vocab_size"], (1, 12)).astype(np.int32)
  with torch.no_grad():
    theirs = model(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
  ours, _ = Decoder(loaded).apply({"params": params}, jnp.asarray(tokens))
  diff = np.abs(np.asarray(ours) - theirs).max()
  assert diff < 1e-4, f"max abs logit difference {diff}"
