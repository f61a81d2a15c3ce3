"""Pretraining: corpus -> tokenizer -> packed rows -> LM loss on the shared loop; eval loss and samples."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from absl import logging
from ml_collections import ConfigDict

from research.data import corpus as corpus_lib
from research.data import loader, stdlib_corpus
from research.data import tokenizer as tokenizer_lib
from research.errors import ConfigError
from research.stages import setup
from research.stages.lm import train_lm
from research.train import workdir as wd


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
    # Imported here: the model zoo pulls in pip and the converters only for `fetch:NAME`.
    from research.interop.model_zoo import resolve_init  # pylint: disable=import-outside-toplevel
    return tokenizer_lib.load_tokenizer(resolve_init(source))
  sample, size = [], 0
  for text in texts:  # the first N bytes of the corpus are plenty to learn merges
    sample.append(text)
    size += len(text)
    if size >= config.data.tokenizer_train_bytes:
      break
  with tempfile.TemporaryDirectory() as out_dir:  # the run saves it into <workdir>/tokenizer
    return tokenizer_lib.train_bpe_tokenizer(sample, config.data.vocab_size, out_dir)


def run(config: ConfigDict, workdir: str, resume: bool = False) -> dict[str, Any]:
  """Trains and returns a summary (final train/eval loss, samples)."""
  mesh, rules = setup.prepare_run(config, workdir, resume)

  init_cfg = init_params = init_tok = None
  resuming = resume and wd.is_workdir(workdir)
  if resuming:  # the run's own model config, whatever `init` or `model.*` say now
    init_cfg = wd.read_model_config(workdir)
  elif config.init:
    init_cfg, init_params, init_tok = setup.load_init_weights(config.init, mesh, rules,
                                                                      config.get("model"))
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

  out = train_lm(config, workdir, resume, mesh=mesh, rules=rules, cfg=cfg, tokenizer=tokenizer,
                 train_rows=train_rows, eval_rows=eval_rows, base_params=init_params,
                 sample_prompts=tuple(config.train.sample_prompts))
  out["samples"] = [p + s for p, s in zip(config.train.sample_prompts, out["samples"])]
  return out
