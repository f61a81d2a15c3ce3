"""Reward model: the decoder with a score head read at the last real token, trained with the rank
loss over all ordered pairs of each prompt's completions (each completion forwarded once)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from research.data import loader
from research.data import preferences as pref_data
from research.data import tokenizer as tokenizer_lib
from research.errors import ConfigError
from research.models.config import ModelConfig
from research.models.heads import SCORE_HEAD, apply_with_head, gather_last, init_with_head
from research.models.peft import NO_PEFT, PeftConfig, split_trainable
from research.objectives.ranking import pair_metrics, rank_loss, reward_centering
from research.stages import setup
from research.stages.base_model import build_base
from research.stages.lm import merge_params
from research.stages.reward_probe import probe_head
from research.stages.sft import peft_from
from research.stages.training import StageSpec, host_slices, run_training
from research.train import workdir as wd

# "random": the score head starts as transformers' does (normal, std 0.02); "probe": at the linear
# probe's fit on the frozen start's features where it reads (research/stages/reward_probe.py).
HEAD_INITS = ("random", "probe")
BATCH_KEYS = ("tokens_bkt", "segment_ids_bkt", "positions_bkt", "last_index_bk", "valid_bk",
              "margin_b")


def reward_init(cfg: ModelConfig, peft: PeftConfig):
  def init(rng):
    return split_trainable(init_with_head(cfg, peft, SCORE_HEAD, rng), peft)
  return init


def completion_scores(params, cfg: ModelConfig, peft: PeftConfig, batch, *, deterministic=True,
                      rng=None) -> jax.Array:
  """[B, K] scores: every completion of every prompt in one forward pass of B*K rows."""
  b, k, t = batch["tokens_bkt"].shape
  flat = lambda x: x.reshape(b * k, t)  # noqa: E731
  values_nt, _, _ = apply_with_head(
      params, cfg, SCORE_HEAD, flat(batch["tokens_bkt"]), flat(batch["segment_ids_bkt"]),
      flat(batch["positions_bkt"]), peft=peft, deterministic=deterministic,
      rngs=None if deterministic else {"dropout": rng})
  return gather_last(values_nt, batch["last_index_bk"].reshape(b * k)).reshape(b, k)


def reward_loss_fn(cfg: ModelConfig, peft: PeftConfig, use_margin: bool, center_coef: float,
                   deterministic: bool):
  """(params, frozen, batch, rng) -> (rank-loss sum [+ centering], pair count, aux)."""
  def loss_fn(params, frozen, batch, rng):
    rewards_bk = completion_scores(merge_params(params, frozen), cfg, peft, batch,
                                   deterministic=deterministic, rng=rng)
    valid_bk = batch["valid_bk"]
    num, den = rank_loss(rewards_bk, valid_bk, margin_b=batch["margin_b"] if use_margin else None)
    if center_coef:
      num = num + reward_centering(rewards_bk, valid_bk, center_coef)
    sums = pair_metrics(rewards_bk, valid_bk)
    aux = {"accuracy": sums["accurate_pairs"] / jnp.maximum(sums["num_pairs"], 1.0),
           "margin": sums["margin_sum"] / jnp.maximum(sums["num_pairs"], 1.0)}
    return num, den, aux
  return loss_fn


def reward_evaluator(rows: dict, batch_size: int, max_batches: int, cfg: ModelConfig,
                     peft: PeftConfig):
  """EvaluatorFactory: held-out pair accuracy, mean margin, loss, reward mean and std."""
  def metric_sums(state, batch):
    params = merge_params(state.params, state.frozen)
    rewards_bk = completion_scores(params, cfg, peft, batch)
    num, _ = rank_loss(rewards_bk, batch["valid_bk"])
    return {**pair_metrics(rewards_bk, batch["valid_bk"]), "loss_sum": num}

  def make(_, sharding):
    if not len(rows["tokens_bkt"]):
      return None
    step = jax.jit(metric_sums)
    device_batches = host_slices(loader.eval_batches(rows, batch_size)[:max_batches], sharding)

    def evaluate(state) -> dict[str, float]:
      total: dict[str, float] = {}
      for batch in device_batches:
        for key, value in jax.device_get(step(state, batch)).items():
          total[key] = total.get(key, 0.0) + float(value)
      pairs, n = max(total["num_pairs"], 1.0), max(total["num_rewards"], 1.0)
      mean = total["reward_sum"] / n
      return {"eval/accuracy": total["accurate_pairs"] / pairs,
              "eval/margin": total["margin_sum"] / pairs, "eval/loss": total["loss_sum"] / pairs,
              "eval/reward_mean": mean,
              "eval/reward_std": float(np.sqrt(max(total["reward_sq_sum"] / n - mean * mean, 0.0))),
              "eval/pairs": total["num_pairs"]}

    return evaluate

  return make


def preference_texts(records: list[dict]) -> list[str]:
  return [r["prompt"] + r["responses"][0] for r in records]


def run(config: ConfigDict, workdir: str, resume: bool = False) -> dict[str, Any]:
  mesh, rules = setup.prepare_run(config, workdir, resume)
  peft = peft_from(config.peft) if "peft" in config else NO_PEFT
  if peft.method not in ("none", "lora"):
    raise ConfigError(f"the reward model trains fully or with LoRA; peft.method={peft.method!r}")
  head_init = config.get("head_init", "random")
  if head_init not in HEAD_INITS:
    raise ConfigError(f"head_init={head_init!r}; choose one of {HEAD_INITS}")
  train_records, eval_records = pref_data.read_preference_splits(
      config.data.path, config.data.eval_count, config.seed, config.data.get("eval_fold", 0))

  base_params = None
  if resume and wd.is_workdir(workdir):
    cfg, tok_dir = wd.read_model_config(workdir), wd.tokenizer_dir(workdir)
  else:
    init = config.init or build_base(config.base, config.mesh, workdir,
                                     preference_texts(train_records))
    cfg, base_params, tok_dir = setup.load_init_weights(init, mesh, rules,
                                                          config.get("model"))
  if not tok_dir:
    raise ConfigError(f"init={config.init!r} has no tokenizer files beside its weights")
  tokenizer = tokenizer_lib.load_tokenizer(tok_dir)
  if config.data.get("chat_template", False):
    train_records = pref_data.chat_records(train_records, tokenizer)
    eval_records = pref_data.chat_records(eval_records, tokenizer)
  tokenize = lambda recs: pref_data.tokenize_preferences(  # noqa: E731
      recs, tokenizer, config.data.max_len, config.data.long_prompts)
  train_rows, report = tokenize(train_records)
  eval_rows, eval_report = tokenize(eval_records) if eval_records else (
      {k: np.zeros((0,)) for k in BATCH_KEYS}, None)
  logging.info("train %s", report)
  print(f"reward data: {report}", flush=True)
  train_rows = {k: train_rows[k] for k in BATCH_KEYS}
  eval_rows = {k: eval_rows[k] for k in BATCH_KEYS}
  if head_init == "probe" and base_params is not None:  # a resumed run has its head already
    base_params = {**base_params, SCORE_HEAD: probe_head(
        base_params, cfg, train_rows, config.train.eval_batch_size, config.seed)}
  wd.write_model_files(workdir, cfg, tokenizer, peft, head=SCORE_HEAD)
  setup.save_run_config(workdir, config)

  spec = StageSpec(
      init_fn=reward_init(cfg, peft),
      train_loss=reward_loss_fn(cfg, peft, config.loss.use_margin, config.loss.center_coef,
                                deterministic=False),
      eval_loss=reward_loss_fn(cfg, peft, False, 0.0, deterministic=True),
      train_rows=train_rows, tokens_per_row=int(np.prod(train_rows["tokens_bkt"].shape[1:])),
      base_params=base_params,
      make_evaluator=reward_evaluator(eval_rows, config.train.eval_batch_size,
                                      config.train.max_eval_batches, cfg, peft),
      meta={"model_config": cfg.to_dict(), "peft_config": peft.to_dict(), "head": SCORE_HEAD},
      lm_loss=False)
  state, last_eval = run_training(config, workdir, resume, spec, mesh=mesh, rules=rules)
  return {"state": state, "eval": last_eval, "model_config": cfg, "report": str(report),
          "eval_report": str(eval_report)}
