"""The optax optimizer from config: AdamW, linear warm-up then cosine decay, global-norm clipping,
weight decay masked off norms and biases."""

from __future__ import annotations

from typing import Any

import jax
import optax

from research.errors import ConfigError

# Leaves whose name is one of these are matrices and decay; norms' `scale` and every `bias` do not.
DECAYED_LEAF_NAMES = ("kernel", "embedding", "lora_a", "lora_b")


def learning_rate_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
  warmup = int(cfg.warmup_steps)
  if warmup < 0 or warmup > total_steps:
    raise ConfigError(f"optimizer.warmup_steps={warmup} must be within [0, train.steps={total_steps}]")
  end = float(cfg.lr) * float(cfg.min_lr_ratio)
  if cfg.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr)],
        [warmup]) if warmup else optax.constant_schedule(cfg.lr)
  if cfg.schedule != "cosine":
    raise ConfigError(f"optimizer.schedule={cfg.schedule!r}; choose 'cosine' or 'constant'")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(cfg.lr), warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=end)


def weight_decay_mask(params: Any) -> Any:
  def decays(path, _):
    # The last dict key names the leaf; metadata boxes (nn.Partitioned) add attribute keys after it.
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return bool(keys) and keys[-1] in DECAYED_LEAF_NAMES
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: Any, total_steps: int, updates_per_step: int = 1
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`cfg` is the `optimizer` section: lr, warmup_steps, schedule, min_lr_ratio, b1, b2, eps,
  weight_decay, clip_norm. Returns (optimizer, schedule over train steps).

  `updates_per_step`: how many optimizer updates one train step makes (PPO's epochs x
  minibatches, GRPO's iterations). optax counts updates, so the optimizer reads the schedule at
  update // updates_per_step: warm-up and decay follow `train.steps` whatever the step's inner
  loop."""
  if not isinstance(updates_per_step, int) or updates_per_step < 1:
    raise ValueError(f"updates_per_step must be a positive integer, got {updates_per_step!r}")
  schedule = learning_rate_schedule(cfg, total_steps)
  by_update = schedule if updates_per_step == 1 else (
      lambda count: schedule(count // updates_per_step))
  parts = []
  if cfg.clip_norm and cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
  parts.append(optax.adamw(by_update, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                           weight_decay=float(cfg.weight_decay), mask=weight_decay_mask))
  return optax.chain(*parts), schedule
