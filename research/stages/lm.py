"""The language-model road shared by pretraining and SFT: decoder init (optionally with PEFT), the
LM loss, evaluation, samples, and `train_lm`, which wires them onto the shared step and loop."""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from research.data import loader
from research.models.config import ModelConfig
from research.models.decoder import Decoder, lm_head_kernel
from research.models.peft import NO_PEFT, PeftConfig, split_trainable
from research.objectives.lm import chunked_head_nll_sum, masked_nll_sum
from research.parallel import activations as act
from research.parallel.rules import Rules
from research.sampling import greedy_generate
from research.stages.training import StageSpec, host_slices, run_training


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


def loss_chunk_len(cfg: ModelConfig, rows: int, length: int) -> int:
  """Positions per chunk of the chunked LM loss: about `cfg.loss_chunk_tokens` tokens over a
  device's `rows` rows, a divisor of `length`; 0 when chunking is off."""
  if not cfg.loss_chunk_tokens:
    return 0
  target = max(1, min(length, cfg.loss_chunk_tokens // max(1, rows)))
  return max(d for d in range(1, target + 1) if length % d == 0)


def lm_loss_fn(cfg: ModelConfig, peft: PeftConfig = NO_PEFT, deterministic: bool = True):
  """(params, frozen, batch, rng) -> (sum of masked token NLL, token count, aux).

  With `cfg.loss_chunk_tokens` the LM head runs inside the chunked loss (never whole [B, T, V]
  logits); the result is the same sum."""
  model = Decoder(cfg, peft, deterministic=deterministic)

  def loss_fn(params, frozen, batch, rng):
    all_params = merge_params(params, frozen)
    b, t = batch["inputs"].shape
    # One group per batch shard: each device's rows form one group of the chunked loss.
    shards = act.batch_shards()
    groups = shards if b % shards == 0 else 1
    chunk_len = loss_chunk_len(cfg, b // groups, t)
    logits_btv, hidden_bte = model.apply(
        {"params": all_params}, batch["inputs"], batch["segment_ids"], batch["positions"],
        compute_logits=not chunk_len, rngs=None if deterministic else {"dropout": rng})
    if not chunk_len:
      num, den = masked_nll_sum(logits_btv, batch["targets"], batch["loss_mask"])
      return num, den, {}
    num, den = chunked_head_nll_sum(hidden_bte, lm_head_kernel(all_params, cfg), batch["targets"],
                                    batch["loss_mask"], chunk_len, groups, act.constrain,
                                    softcap=cfg.final_logit_softcap)
    return num, den, {}

  return loss_fn


def lm_evaluator(rows: dict[str, np.ndarray], batch_size: int, max_batches: int):
  """EvaluatorFactory: {'eval/loss', 'eval/perplexity', 'eval/tokens'} over fixed held-out batches."""

  def make(eval_step, sharding):
    if not len(rows["inputs"]):
      return None
    device_batches = host_slices(loader.eval_batches(rows, batch_size)[:max_batches], sharding)

    def evaluate(state) -> dict[str, float]:
      num = den = 0.0
      for batch in device_batches:
        n, d = eval_step(state, batch)
        num, den = num + float(n), den + float(d)
      loss = num / max(den, 1.0)
      return {"eval/loss": loss, "eval/perplexity": float(np.exp(min(loss, 80.0))),
              "eval/tokens": den}

    return evaluate

  return make


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
  samples_path = os.path.join(workdir, "samples.txt")
  sample = lambda title, st: write_samples(  # noqa: E731
      samples_path, title, merge_params(st.params, st.frozen), cfg, tokenizer, sample_prompts,
      config.train.sample_tokens, peft)
  before: list[str] = []

  def before_loop(state, start_step):
    if sample_before and sample_prompts and start_step == 0:
      before.extend(sample("before training", state))

  spec = StageSpec(
      init_fn=decoder_init(cfg, peft), train_loss=lm_loss_fn(cfg, peft, deterministic=False),
      eval_loss=lm_loss_fn(cfg, peft, deterministic=True), train_rows=train_rows,
      tokens_per_row=train_rows["inputs"].shape[1], base_params=base_params,
      make_evaluator=lm_evaluator(eval_rows, config.train.eval_batch_size,
                                  config.train.max_eval_batches),
      meta={"model_config": cfg.to_dict(), "peft_config": peft.to_dict()},
      before_loop=before_loop)
  state, last_eval = run_training(config, workdir, resume, spec, mesh=mesh, rules=rules)
  after = sample(f"step {config.train.steps}", state) if sample_prompts else []
  return {"samples": after, "samples_before": before, "state": state, "model_config": cfg,
          "eval": last_eval}
