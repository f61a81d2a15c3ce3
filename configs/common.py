"""Config sections every stage shares (model, optimizer, mesh, train loop), as ml_collections data."""

from __future__ import annotations

import dataclasses
import os

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from research.models.config import RUNTIME_FIELDS, ModelConfig

_FROM_TOKENIZER = ("bos_token_id", "eos_token_id", "pad_token_id")
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_data(name: str) -> str:
  """Absolute path of `data/<name>` in this repository: presets run from any working directory."""
  return os.path.join(_REPO_ROOT, "data", name)


def model_config(**overrides) -> ConfigDict:
  """Fields of research.models.config.ModelConfig, with its defaults (one place for them); here
  vocab_size 0 takes the tokenizer's size, the architecture is "llama", and the special-token ids
  come from the tokenizer (not fields here)."""
  fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)
            if f.name not in _FROM_TOKENIZER}
  c = ConfigDict({**fields, "vocab_size": 0, "head_dim": placeholder(int),
                  "hf_architecture": "llama"})
  c.update(overrides)
  return c


def runtime_config(**overrides) -> ConfigDict:
  """The `model` section of a stage that starts from a checkpoint (`init`): only the fields that
  say how to run it (dtype, remat, attention, ...), with ModelConfig's defaults; the
  architecture comes from the checkpoint."""
  fields = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in RUNTIME_FIELDS}
  c = ConfigDict(fields)
  c.update(overrides)
  return c


def optimizer_config(**overrides) -> ConfigDict:
  c = ConfigDict(dict(lr=3e-3, warmup_steps=20, schedule="cosine", min_lr_ratio=0.1, b1=0.9,
                      b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0))
  c.update(overrides)
  return c


def mesh_config(**overrides) -> ConfigDict:
  """Mesh axis sizes (-1 fills the remaining devices) and optional logical-axis rule overrides,
  e.g. rules=(("embed", None), ("mlp", "tensor")) replaces those entries of the default rules."""
  c = ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules=()))
  c.update(overrides)
  return c


def train_config(**overrides) -> ConfigDict:
  c = ConfigDict(dict(
      steps=200, global_batch=8, micro_batches=1, log_every=10, eval_every=50,
      eval_batch_size=8, max_eval_batches=8, checkpoint_every=100, keep_checkpoints=3,
      async_checkpoints=True, stop_at_step=0, sample_prompts=("",), sample_tokens=48,
      # Steps in a row whose loss or gradient norm is not finite that are skipped (the weights
      # kept) before the run stops; 0 stops at the first.
      max_bad_steps=0))
  c.update(overrides)
  return c
