"""A small base model built on demand: when a stage gets no `init`, it pretrains one (tokenizer
included) on its own training text in `<workdir>/base`, so every preset runs from a fresh clone."""

from __future__ import annotations

import json
import os
from typing import Sequence

from absl import logging
from ml_collections import ConfigDict

from research.stages import pretrain
from research.train import workdir as wd
from research.train.checkpoints import Checkpointer


def build_base(base: ConfigDict, mesh: ConfigDict, workdir: str, texts: Sequence[str]) -> str:
  """Pretrains `base` (a pretraining config) on `texts` once; a finished base is reused."""
  base_dir = os.path.join(workdir, "base")
  corpus = os.path.join(workdir, "base_corpus.jsonl")
  if not os.path.isfile(corpus):
    with open(corpus + ".tmp", "w", encoding="utf-8") as f:
      for text in texts:
        f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    os.replace(corpus + ".tmp", corpus)
  if os.path.isdir(wd.checkpoint_dir(base_dir)):
    ckpt = Checkpointer(wd.checkpoint_dir(base_dir), max_to_keep=1_000_000)
    done = ckpt.latest_step() == base.train.steps
    ckpt.close()
    if done:
      return base_dir
  base = ConfigDict(base.to_dict())
  base.data.corpus = corpus
  base.mesh = ConfigDict(mesh.to_dict())
  logging.info("no init given: pretraining a small base in %s", base_dir)
  print(f"no init given: pretraining a small base model in {base_dir}", flush=True)
  pretrain.run(base, base_dir, resume="auto")
  return base_dir
