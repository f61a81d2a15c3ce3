"""Supervised fine-tuning (full, LoRA, prompt tuning, adapters): records -> masked rows -> train_lm.

With no `init` the stage first pretrains a small base (and its tokenizer) on the training records'
text, in `<workdir>/base`, so a preset runs from a fresh clone with nothing else.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from absl import logging
from ml_collections import ConfigDict

from research.data import sft as sft_data
from research.data import tokenizer as tokenizer_lib
from research.errors import ConfigError
from research.models.peft import PeftConfig
from research.stages import setup
from research.stages.base_model import build_base
from research.stages.lm import train_lm
from research.train import workdir as wd


def peft_from(section: ConfigDict) -> PeftConfig:
  fields = section.to_dict()
  fields["targets"] = tuple(fields.get("targets", ()))
  return PeftConfig(**fields)


def record_texts(records: list[dict]) -> list[str]:
  return ["\n".join(m["content"] for m in r["messages"]) for r in records]


def response_start(loss_on: np.ndarray) -> int:
  """Index of the first token of the last response (where a generation prompt ends)."""
  starts = np.flatnonzero(loss_on & ~np.concatenate([[False], loss_on[:-1]]))
  return int(starts[-1]) if len(starts) else len(loss_on)


def run(config: ConfigDict, workdir: str, resume: bool = False) -> dict[str, Any]:
  mesh, rules = setup.prepare_run(config, workdir, resume)
  peft = peft_from(config.peft)
  if peft.method == "prompt" and config.data.pack:
    raise ConfigError("peft.method='prompt' prepends the soft prompt to each row: set "
                      "--config.data.pack=False")
  paths = [p.strip() for p in config.data.path.split(",") if p.strip()]
  if not paths:
    raise ConfigError("data.path is empty: name the SFT json/jsonl/parquet file(s)")
  records = sft_data.read_sft_records(paths, config.data.format)
  train_records, eval_records = sft_data.split_records(records, config.data.eval_fraction,
                                                       seed=config.seed)

  base_params = None
  if resume and wd.is_workdir(workdir):
    cfg = wd.read_model_config(workdir)
    tok_dir = wd.tokenizer_dir(workdir)
  else:
    init = config.init or build_base(config.base, config.mesh, workdir,
                                     record_texts(train_records))
    cfg, base_params, tok_dir = setup.load_init_weights(init, mesh, rules, config.get("model"))
  if not tok_dir:
    raise ConfigError(f"init={config.init!r} has no tokenizer files; SFT needs the base model's "
                      "tokenizer beside its weights")
  tokenizer = tokenizer_lib.load_tokenizer(tok_dir)
  if len(tokenizer) > cfg.vocab_size:
    raise ConfigError(f"the tokenizer in {tok_dir} has {len(tokenizer)} tokens but the model's "
                      f"vocabulary is {cfg.vocab_size}")

  seq_len = config.data.seq_len
  train_examples, report = sft_data.tokenize_sft(train_records, tokenizer, seq_len,
                                                 config.data.overflow)
  eval_examples, eval_report = sft_data.tokenize_sft(eval_records, tokenizer, seq_len,
                                                     config.data.overflow)
  logging.info("train %s", report)
  logging.info("eval %s", eval_report)
  print(f"SFT data: {report}", flush=True)
  pad_id = tokenizer.pad_token_id
  train_rows = sft_data.sft_rows(train_examples, seq_len, pad_id, config.data.pack)
  eval_rows = sft_data.sft_rows(eval_examples, seq_len, pad_id, config.data.pack)
  wd.write_model_files(workdir, cfg, tokenizer, peft)
  setup.save_run_config(workdir, config)

  prompts = [ids[:response_start(loss_on)].tolist() for ids, loss_on in eval_examples[:3]]
  out = train_lm(config, workdir, resume, mesh=mesh, rules=rules, cfg=cfg, tokenizer=tokenizer,
                 train_rows=train_rows, eval_rows=eval_rows, base_params=base_params, peft=peft,
                 sample_prompts=prompts, sample_before=True)
  out["report"] = {"train": str(report), "eval": str(eval_report)}
  out["sample_prompts"] = [tokenizer.decode(p) for p in prompts]
  return out
