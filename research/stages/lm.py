"""The language-model road shared by pretraining and SFT: decoder init (optionally with PEFT), the
LM loss, evaluation, samples, and `train_lm`, which wires them onto the shared step and loop."""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh
from ml_collections import ConfigDict

from research.data import loader
from research.models.config import ModelConfig
from research.models.decoder import Decoder
from research.models.peft import NO_PEFT, PeftConfig, split_trainable
from research.objectives.lm import masked_nll_sum
from research.parallel.distributed import global_batch_from_local
from research.parallel.rules import Rules, batch_sharding
from research.sampling import greedy_generate
from research.stages import setup
from research.train import workdir as wd
from research.train.checkpoints import Checkpointer
from research.train.loop import LoopHooks
from research.train.optimizer import make_optimizer
from research.train.state import abstract_state
from research.train.step import jit_eval_step, jit_train_step, make_eval_step, make_train_step


def merge_params(trainable: Any, frozen: Any) -> Any:
  """Union of two nested dicts (a leaf lives in exactly one of them)."""
  if not frozen:
    return trainable
  if not trainable:
    return frozen
  out = dict(frozen)
  for k, v in trainable.items():
    out[k] = merge_params(v, frozen[k]) if k in frozen and isinstance(v, dict) else v
  return out


def decoder_init(cfg: ModelConfig, peft: PeftConfig = NO_PEFT, seq_len: int = 8):
  """BoxedInit: (trainable, frozen) decoder params; with PEFT only the added params train."""
  model = Decoder(cfg, peft)

  def init(rng: jax.Array):
    tokens_bt = jnp.zeros((1, seq_len), jnp.int32)
    return split_trainable(model.init(rng, tokens_bt)["params"], peft)

  return init


def lm_loss_fn(cfg: ModelConfig, peft: PeftConfig = NO_PEFT, deterministic: bool = True):
  """(params, frozen, batch, rng) -> (sum of masked token NLL, token count, aux)."""
  model = Decoder(cfg, peft, deterministic=deterministic)

  def loss_fn(params, frozen, batch, rng):
    logits_btv, _ = model.apply({"params": merge_params(params, frozen)}, batch["inputs"],
                                batch["segment_ids"], batch["positions"],
                                rngs=None if deterministic else {"dropout": rng})
    num, den = masked_nll_sum(logits_btv, batch["targets"], batch["loss_mask"])
    return num, den, {}

  return loss_fn


def lm_evaluator(eval_step, rows: dict[str, np.ndarray], batch_size: int, max_batches: int,
                 sharding) -> Any:
  """state -> {'eval/loss', 'eval/perplexity', 'eval/tokens'} over fixed held-out batches."""
  batches = loader.eval_batches(rows, batch_size)[:max_batches] if len(rows["inputs"]) else []
  per_process = batch_size // jax.process_count()
  lo = jax.process_index() * per_process
  device_batches = [global_batch_from_local({k: v[lo:lo + per_process] for k, v in b.items()},
                                            sharding) for b in batches]

  def evaluate(state) -> dict[str, float]:
    num = den = 0.0
    for batch in device_batches:
      n, d = eval_step(state, batch)
      num, den = num + float(n), den + float(d)
    loss = num / max(den, 1.0)
    return {"eval/loss": loss, "eval/perplexity": float(np.exp(min(loss, 80.0))),
            "eval/tokens": den}

  return evaluate if device_batches else None


def write_samples(path: str, title: str, params: Any, cfg: ModelConfig, tokenizer: Any,
                  prompts: Sequence[str | Sequence[int]], max_new_tokens: int,
                  peft: PeftConfig = NO_PEFT) -> list[str]:
  """Greedy continuations of prompts (text, or token ids), appended to `path` under `title`."""
  encoded = [(tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else
              list(p)) or [tokenizer.eos_token_id] for p in prompts]
  prompts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts]
  outs = greedy_generate(params, cfg, encoded, max_new_tokens, pad_id=tokenizer.pad_token_id,
                         eos_id=tokenizer.eos_token_id, peft=peft)
  texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
  if jax.process_index() == 0:
    with open(path, "a", encoding="utf-8") as f:
      for p, t in zip(prompts, texts):
        f.write(f"=== {title} ===\n{p}{t}\n")
  return texts


def train_lm(config: ConfigDict, workdir: str, resume: bool, *, mesh: Mesh, rules: Rules,
             cfg: ModelConfig, tokenizer: Any, train_rows: dict, eval_rows: dict,
             base_params: Any = None, peft: PeftConfig = NO_PEFT,
             sample_prompts: Sequence[str | Sequence[int]] = (),
             sample_before: bool = False) -> dict[str, Any]:
  """Trains `cfg` (+`peft`) on packed LM rows; returns samples, the final state and eval metrics.

  `base_params` (e.g. imported weights) start the run: all of them train without PEFT; with PEFT
  they are frozen and only the method's fresh params train.
  """
  seq_len = train_rows["inputs"].shape[1]
  tx, schedule = make_optimizer(config.optimizer, config.train.steps)
  init_fn = decoder_init(cfg, peft)
  abstract, shardings = abstract_state(init_fn, tx, mesh, rules)
  checkpointer = Checkpointer(wd.checkpoint_dir(workdir), config.train.keep_checkpoints,
                              async_save=config.train.async_checkpoints)
  init_params = None
  if base_params is not None:
    def init_params():
      if peft.method == "none":
        return base_params, {}
      fresh, _ = jax.jit(init_fn, out_shardings=(shardings.params, shardings.frozen))(
          jax.random.PRNGKey(config.seed))
      return fresh, base_params
  state, start_step, extra = setup.start_state(
      config=config, workdir=workdir, resume=resume, abstract=abstract, shardings=shardings,
      init_fn=init_fn, tx=tx, checkpointer=checkpointer, init_params=init_params)
  if start_step:
    logging.info("resumed from step %d", start_step)

  b_sharding = batch_sharding(mesh, rules)
  train_loss = lm_loss_fn(cfg, peft, deterministic=False)
  eval_loss = lm_loss_fn(cfg, peft, deterministic=True)
  train_step = jit_train_step(make_train_step(train_loss, tx, schedule, config.train.micro_batches),
                              shardings, b_sharding)
  eval_step = jit_eval_step(make_eval_step(eval_loss), shardings, b_sharding)
  batches = loader.BatchIterator(train_rows, config.train.global_batch, config.seed,
                                 start_position=extra.get("data_position", 0),
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
  evaluate = lm_evaluator(eval_step, eval_rows, config.train.eval_batch_size,
                          config.train.max_eval_batches, b_sharding)
  samples_path = os.path.join(workdir, "samples.txt")
  sample = lambda title, st: write_samples(  # noqa: E731
      samples_path, title, merge_params(st.params, st.frozen), cfg, tokenizer, sample_prompts,
      config.train.sample_tokens, peft)
  before = sample("before training", state) if sample_before and sample_prompts and \
      start_step == 0 else []
  final_eval: dict[str, float] = {}

  def on_eval(step, metrics):
    final_eval.update(metrics)

  hooks = LoopHooks(
      train_step=train_step,
      next_batch=lambda: global_batch_from_local(next(batches), b_sharding),
      tokens_per_step=config.train.global_batch * seq_len,
      evaluate=(lambda st: _tap(evaluate(st), on_eval)) if evaluate else None,
      checkpoint_extra=lambda: {"data_position": batches.position, "config": config.to_dict(),
                                "model_config": cfg.to_dict(), "peft_config": peft.to_dict()})
  try:
    state = setup.run_loop(config=config, workdir=workdir, state=state, start_step=start_step,
                           hooks=hooks, checkpointer=checkpointer)
  finally:
    checkpointer.close()
  after = sample(f"step {config.train.steps}", state) if sample_prompts else []
  return {"samples": after, "samples_before": before, "state": state, "model_config": cfg,
          "eval": final_eval}


def _tap(metrics: dict, fn) -> dict:
  fn(None, metrics)
  return metrics
