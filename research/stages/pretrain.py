"""Pretraining: corpus -> tokenizer -> packed rows -> LM loss on the shared loop; eval loss and samples."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from research.data import corpus as corpus_lib
from research.data import loader, stdlib_corpus
from research.data import tokenizer as tokenizer_lib
from research.errors import ConfigError
from research.models.config import ModelConfig
from research.parallel.distributed import check_global_batch, global_batch_from_local
from research.parallel.rules import batch_shard_count, batch_sharding
from research.sampling import greedy_generate
from research.stages import setup
from research.stages.lm import decoder_init, lm_loss_fn
from research.train import workdir as wd
from research.train.checkpoints import Checkpointer
from research.train.loop import LoopHooks
from research.train.optimizer import make_optimizer
from research.train.state import abstract_state
from research.train.step import jit_eval_step, jit_train_step, make_eval_step, make_train_step


def corpus_texts(config: ConfigDict, workdir: str) -> list[str]:
  paths = [p.strip() for p in config.data.corpus.split(",") if p.strip()]
  if not paths:  # the embedded default: the Python standard library's own source
    path = os.path.join(workdir, "corpus", "python_stdlib.jsonl")
    if not os.path.isfile(path):
      stdlib_corpus.write_stdlib_corpus(path, config.data.stdlib_max_bytes)
    paths = [path]
  return corpus_lib.read_corpus(paths, text_field=config.data.text_field)


def prepare_tokenizer(config: ConfigDict, workdir: str, texts: list[str],
                      init_tokenizer: str | None) -> Any:
  """The run's tokenizer: the workdir's (resume), the init model's, a named one, or trained here."""
  saved = wd.tokenizer_dir(workdir)
  if saved:
    return tokenizer_lib.load_tokenizer(saved)
  source = config.data.tokenizer or init_tokenizer
  if source:
    return tokenizer_lib.load_tokenizer(source)
  sample, size = [], 0
  for text in texts:  # the first N bytes of the corpus are plenty to learn merges
    sample.append(text)
    size += len(text)
    if size >= config.data.tokenizer_train_bytes:
      break
  with tempfile.TemporaryDirectory() as out_dir:  # the run saves it into <workdir>/tokenizer
    return tokenizer_lib.train_bpe_tokenizer(sample, config.data.vocab_size, out_dir)


def lm_evaluator(eval_step, rows: dict[str, np.ndarray], batch_size: int, max_batches: int,
                 sharding) -> Any:
  batches = loader.eval_batches(rows, batch_size)[:max_batches] if rows else []
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


def write_samples(path: str, step: int, params: Any, cfg: ModelConfig, tokenizer: Any,
                  prompts: tuple[str, ...], max_new_tokens: int) -> list[str]:
  encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
             for p in prompts]
  outs = greedy_generate(params, cfg, encoded, max_new_tokens, pad_id=tokenizer.pad_token_id,
                         eos_id=tokenizer.eos_token_id)
  texts = [p + tokenizer.decode(o, skip_special_tokens=True) for p, o in zip(prompts, outs)]
  if jax.process_index() == 0:
    with open(path, "a", encoding="utf-8") as f:
      for t in texts:
        f.write(f"=== step {step} ===\n{t}\n")
  return texts


def run(config: ConfigDict, workdir: str, resume: bool = False) -> dict[str, Any]:
  """Trains and returns a summary (final train/eval loss, samples)."""
  os.makedirs(workdir, exist_ok=True)
  setup.check_workdir(workdir, resume)
  mesh, rules = setup.mesh_from(config), setup.rules_from(config)
  check_global_batch(config.train.global_batch, config.train.micro_batches,
                     batch_shard_count(mesh, rules))

  init_cfg = init_params = init_tok = None
  resuming = resume and wd.is_workdir(workdir)
  if resuming:  # the run's own model config, whatever `init` or `model.*` say now
    init_cfg = wd.read_model_config(workdir)
  elif config.init:
    init_cfg, init_params, init_tok = setup.load_init_weights(config.init, mesh, rules)
  texts = corpus_texts(config, workdir)
  tokenizer = prepare_tokenizer(config, workdir, texts, init_tok)
  cfg = init_cfg or setup.model_config_from(config.model, len(tokenizer), tokenizer)
  if init_cfg is not None and len(tokenizer) > cfg.vocab_size:
    raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the init model's vocabulary "
                      f"is {cfg.vocab_size}")
  wd.write_model_files(workdir, cfg, tokenizer)
  setup.save_run_config(workdir, config)

  train_rows, eval_rows = loader.pretraining_rows(texts, tokenizer, config.data.seq_len,
                                                  config.data.eval_fraction, config.seed)
  logging.info("corpus: %d documents, %d train rows, %d eval rows of %d tokens", len(texts),
               len(train_rows["inputs"]), len(eval_rows["inputs"]), config.data.seq_len)

  tx, schedule = make_optimizer(config.optimizer, config.train.steps)
  init_fn = decoder_init(cfg)
  abstract, shardings = abstract_state(init_fn, tx, mesh, rules)
  checkpointer = Checkpointer(wd.checkpoint_dir(workdir), config.train.keep_checkpoints,
                              async_save=config.train.async_checkpoints)
  state, start_step, extra = setup.start_state(
      config=config, workdir=workdir, resume=resume, abstract=abstract, shardings=shardings,
      init_fn=init_fn, tx=tx, checkpointer=checkpointer,
      init_params=(lambda: (init_params, {})) if init_params is not None else None)
  if start_step:
    logging.info("resumed from step %d", start_step)

  b_sharding = batch_sharding(mesh, rules)
  loss_fn = lm_loss_fn(cfg)
  train_step = jit_train_step(make_train_step(loss_fn, tx, schedule, config.train.micro_batches),
                              shardings, b_sharding)
  eval_step = jit_eval_step(make_eval_step(loss_fn), shardings, b_sharding)
  batches = loader.BatchIterator(train_rows, config.train.global_batch, config.seed,
                                 start_position=extra.get("data_position", 0),
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
  hooks = LoopHooks(
      train_step=train_step,
      next_batch=lambda: global_batch_from_local(next(batches), b_sharding),
      tokens_per_step=config.train.global_batch * config.data.seq_len,
      evaluate=lm_evaluator(eval_step, eval_rows, config.train.eval_batch_size,
                            config.train.max_eval_batches, b_sharding),
      checkpoint_extra=lambda: {"data_position": batches.position, "config": config.to_dict(),
                                "model_config": cfg.to_dict()})
  try:
    state = setup.run_loop(config=config, workdir=workdir, state=state, start_step=start_step,
                           hooks=hooks, checkpointer=checkpointer)
  finally:
    checkpointer.close()
  samples = write_samples(os.path.join(workdir, "samples.txt"), config.train.steps, state.params,
                          cfg, tokenizer, tuple(config.train.sample_prompts),
                          config.train.sample_tokens)
  return {"samples": samples, "state": state, "model_config": cfg}
