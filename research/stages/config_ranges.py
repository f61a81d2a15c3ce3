"""The allowed range of every numeric config field, checked when a run starts: a value out of range
is one line naming the field, its value and the range, before anything is built or written.

Fields are matched by (section, name), whatever encloses the section, so nested configs (PPO's
`base.train.steps`, `reward_training.optimizer.lr`) are checked by the same rules.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

from ml_collections import ConfigDict

from research.errors import ConfigError


class Range(NamedTuple):
  test: Callable[[float], bool]
  says: str  # "must be ..." completed


def at_least(lo: float) -> Range:
  return Range(lambda v: v >= lo, f">= {lo}")


def above(lo: float) -> Range:
  return Range(lambda v: v > lo, f"> {lo}")


def within(lo: float, hi: float, open_hi: bool = False) -> Range:
  if open_hi:
    return Range(lambda v: lo <= v < hi, f"in [{lo}, {hi})")
  return Range(lambda v: lo <= v <= hi, f"in [{lo}, {hi}]")


_MESH_AXIS = Range(lambda v: v == -1 or v >= 1, "-1 (the remaining devices) or >= 1")

RANGES: dict[tuple[str, str], Range] = {
    # train loop
    ("train", "steps"): at_least(1), ("train", "global_batch"): at_least(1),
    ("train", "micro_batches"): at_least(1), ("train", "log_every"): at_least(1),
    ("train", "eval_every"): at_least(0), ("train", "eval_batch_size"): at_least(1),
    ("train", "max_eval_batches"): at_least(1), ("train", "checkpoint_every"): at_least(0),
    ("train", "keep_checkpoints"): at_least(1), ("train", "stop_at_step"): at_least(0),
    ("train", "sample_tokens"): at_least(1), ("train", "max_bad_steps"): at_least(0),
    # optimizer
    ("optimizer", "lr"): above(0), ("optimizer", "warmup_steps"): at_least(0),
    ("optimizer", "min_lr_ratio"): within(0, 1), ("optimizer", "b1"): within(0, 1, open_hi=True),
    ("optimizer", "b2"): within(0, 1, open_hi=True), ("optimizer", "eps"): above(0),
    ("optimizer", "weight_decay"): at_least(0), ("optimizer", "clip_norm"): at_least(0),
    # data
    ("data", "seq_len"): at_least(2), ("data", "eval_fraction"): within(0, 1, open_hi=True),
    ("data", "vocab_size"): at_least(1), ("data", "stdlib_max_bytes"): at_least(1),
    ("data", "tokenizer_train_bytes"): at_least(1), ("data", "eval_count"): at_least(0),
    ("data", "eval_fold"): at_least(0),
    ("data", "max_len"): at_least(2), ("data", "max_prompt_len"): at_least(1),
    ("data", "eval_draws"): at_least(1),
    # model (vocab_size 0 follows the tokenizer)
    ("model", "vocab_size"): at_least(0), ("model", "hidden_size"): at_least(1),
    ("model", "num_layers"): at_least(1), ("model", "num_heads"): at_least(1),
    ("model", "num_kv_heads"): at_least(1), ("model", "mlp_dim"): at_least(1),
    ("model", "head_dim"): at_least(1), ("model", "max_position_embeddings"): at_least(1),
    ("model", "rms_norm_eps"): above(0), ("model", "rope_theta"): above(0),
    ("model", "layer_streams"): at_least(0), ("model", "loss_chunk_tokens"): at_least(0),
    ("model", "rope_local_theta"): above(0), ("model", "sliding_window"): at_least(1),
    ("model", "norm_offset"): at_least(0), ("model", "query_pre_attn_scalar"): above(0),
    ("model", "attn_logit_softcap"): above(0), ("model", "final_logit_softcap"): above(0),
    # PEFT
    ("peft", "r"): at_least(1), ("peft", "alpha"): above(0),
    ("peft", "dropout"): within(0, 1, open_hi=True),
    ("peft", "num_virtual_tokens"): at_least(0), ("peft", "adapter_dim"): at_least(0),
    # PPO and its sampling
    ("ppo", "cliprange"): above(0), ("ppo", "cliprange_value"): above(0),
    ("ppo", "epochs"): at_least(1), ("ppo", "minibatches"): at_least(1),
    ("ppo", "gamma"): within(0, 1), ("ppo", "lam"): within(0, 1), ("ppo", "kl_coef"): at_least(0),
    ("ppo", "kl_target"): above(0), ("ppo", "kl_horizon"): above(0),
    ("ppo", "kl_bound"): at_least(0), ("ppo", "vf_coef"): at_least(0),
    ("ppo", "missing_eos_penalty"): at_least(0),
    ("sampling", "max_new_tokens"): at_least(1), ("sampling", "temperature"): at_least(0),
    ("sampling", "top_k"): at_least(0),
    ("sampling", "top_p"): Range(lambda v: 0 < v <= 1, "in (0, 1]"),
    ("mesh", "data"): _MESH_AXIS, ("mesh", "fsdp"): _MESH_AXIS, ("mesh", "tensor"): _MESH_AXIS,
    ("", "seed"): at_least(0), ("base", "seed"): at_least(0),
    ("reward_training", "seed"): at_least(0),
    # reward model
    ("loss", "center_coef"): at_least(0),
    # DPO family
    ("dpo", "beta"): above(0), ("dpo", "gamma"): at_least(0),
    ("dpo", "label_smoothing"): within(0, 0.5, open_hi=True),
    # distillation (the student's model fields as the model's)
    ("distill", "beta"): within(0, 1), ("distill", "lm_weight"): at_least(0),
    ("distill", "temperature"): above(0), ("distill", "lmbda"): within(0, 1),
    ("distill", "max_new_tokens"): at_least(1), ("distill", "sample_temperature"): at_least(0),
    ("distill", "top_k"): at_least(0), ("distill", "top_p"): Range(lambda v: 0 < v <= 1, "in (0, 1]"),
    # GRPO and its task
    ("grpo", "beta"): at_least(0), ("grpo", "epsilon_low"): within(0, 1, open_hi=True),
    ("grpo", "epsilon_high"): above(0), ("grpo", "group_size"): at_least(2),
    ("grpo", "iterations"): at_least(1), ("reward", "max_chars"): at_least(1),
    ("task", "eval_count"): at_least(1), ("task", "train_count"): at_least(1),
    ("task", "max_prompt_len"): at_least(1), ("task", "max_value"): at_least(1),
    ("task", "operations"): at_least(1),
}
# The distillation student's section takes the model's rules.
RANGES.update({("student", name): rule for (section, name), rule in list(RANGES.items())
               if section == "model"})


def _numeric_leaves(config: ConfigDict, path: tuple[str, ...] = ()):
  for key, value in config.items():
    if isinstance(value, ConfigDict):
      yield from _numeric_leaves(value, path + (key,))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      yield path + (key,), value


def check_config_ranges(config: ConfigDict) -> None:
  """Raises ConfigError for the first numeric field that is not finite or out of its range."""
  for path, value in _numeric_leaves(config):
    name = ".".join(path)
    if not math.isfinite(value):
      raise ConfigError(f"config {name}={value} is not a finite number; set "
                        f"--config.{name}=VALUE")
    rule = RANGES.get((path[-2] if len(path) > 1 else "", path[-1]))
    if rule is not None and not rule.test(value):
      raise ConfigError(f"config {name}={value} is out of range: it must be {rule.says}; set "
                        f"--config.{name}=VALUE")
