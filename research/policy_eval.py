"""A trained policy and its reference, side by side, on its run's held-out prompts: what
`scripts/policy_kl.py` (KL to the reference) and `scripts/score_answers.py` (a reward model
scoring both models' answers) share.

The run's own config.json names the held-out prompts (GRPO: the task's held-out problems; DPO and
PPO: the held-out records of its preference data, split as the run split them) and, for GRPO, its
sampling settings. The reference is what the run measured itself against: the base with the adapter
off for a LoRA run, else the run's `init`, or any workdir / Hugging Face directory given explicitly.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from research.data import preferences as pref_data
from research.data.tokenizer import load_tokenizer
from research.errors import ConfigError
from research.models.config import ModelConfig
from research.models.peft import NO_PEFT, PeftConfig, strip_peft
from research.parallel.mesh import make_mesh
from research.parallel.rules import DEFAULT_RULES
from research.sampling import SamplingConfig, generate_tokens, left_pad
from research.train import workdir as wd
from research.train.metrics import CONFIG_FILE, read_config

STAGES = ("grpo", "dpo", "ppo")
STAGE_NAMES = "GRPO, DPO or PPO"


@dataclasses.dataclass
class Model:
  cfg: ModelConfig
  params: Any
  peft: PeftConfig = NO_PEFT
  source: str = ""


@dataclasses.dataclass
class PolicyRun:
  config: ConfigDict
  policy: Model
  reference: Model
  tokenizer: Any
  mesh: Any


def read_run_config(workdir: str) -> ConfigDict:
  saved = read_config(workdir)
  if saved is None:
    raise ConfigError(f"{workdir} has no {CONFIG_FILE}; pass the --workdir of a "
                      f"{STAGE_NAMES} run")
  config = ConfigDict(saved)
  if config.get("stage") not in STAGES:
    raise ConfigError(f"{workdir} is a {config.get('stage')!r} run; this reads "
                      f"{STAGE_NAMES} runs, whose configs name "
                      "held-out prompts")
  return config


def load_policy_run(workdir: str, step: int | None = None, reference: str = "") -> PolicyRun:
  """The policy at `step` (None: the newest checkpoint) and its reference (see the module doc)."""
  from research.stages import setup  # pylint: disable=import-outside-toplevel
  config = read_run_config(workdir)
  mesh = make_mesh({"data": -1})
  cfg, peft, params, tok_dir, _ = wd.load_run(workdir, step, mesh=mesh)
  policy = Model(cfg, params, peft, f"{workdir} step {step if step is not None else 'newest'}")
  if peft.method == "lora" and not reference:
    ref = Model(cfg, strip_peft(params), NO_PEFT, "the base, adapter off")
  else:
    source = reference or config.get("init", "")
    if not source:
      raise ConfigError(f"{workdir} built its own base (init=''); name the reference weights "
                        "(--reference=DIR)")
    ref_cfg, ref_params, _ = setup.load_init_weights(source, mesh, DEFAULT_RULES)
    ref = Model(ref_cfg, ref_params, NO_PEFT, source)
  if ref.cfg.vocab_size != cfg.vocab_size:
    raise ConfigError(f"the reference {ref.source} has vocab {ref.cfg.vocab_size} and the policy "
                      f"{cfg.vocab_size}: they must share a tokenizer")
  return PolicyRun(config, policy, ref, load_tokenizer(tok_dir), mesh)


def held_out_prompts(config: ConfigDict, tokenizer: Any) -> tuple[list[list[int]], list[dict]]:
  """(token ids, records) of the run's held-out prompts, tokenised as the run tokenised them."""
  # pylint: disable=import-outside-toplevel
  if config.stage == "grpo":
    from research.stages import grpo
    _, records = grpo.task_examples(config.task, config.seed)
    return (grpo.prompt_ids(records, tokenizer, config.task.chat_template,
                            config.task.max_prompt_len), records)
  if not config.data.get("path"):
    raise ConfigError(f"the {config.stage} run read no preference file (data.path is empty), so "
                      "it has no held-out prompts to read")
  _, records = pref_data.read_preference_splits(config.data.path, config.data.eval_count,
                                                config.seed, config.data.get("eval_fold", 0))
  if config.data.get("chat_template", False):
    records = pref_data.chat_records(records, tokenizer)
  max_len = config.data.get("max_prompt_len", config.data.get("max_len", 512))
  return pref_data.prompt_ids(records, tokenizer, max_len), records


def generate_rows(model: Model, ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                  pad_id: int, batch_size: int, seed: int = 0):
  """Yields (first row, rows n, tokens [N, P], segments [N, P], responses [N, R], lengths [N]) per
  batch: every batch padded to one width and N = `batch_size` rows (the first n real), so one
  program serves them all; batch `b` samples with key `fold_in(PRNGKey(seed), b)`, so reruns
  agree."""
  tokens, segments = left_pad(list(ids), pad_id)
  for b, lo in enumerate(range(0, len(ids), batch_size)):
    t, g = tokens[lo:lo + batch_size], segments[lo:lo + batch_size]
    n = len(t)
    t = np.concatenate([t, np.repeat(t[:1], batch_size - n, 0)])
    g = np.concatenate([g, np.repeat(g[:1], batch_size - n, 0)])
    key = jax.random.fold_in(jax.random.PRNGKey(seed), b)
    resp, lengths = generate_tokens(model.params, jnp.asarray(t), jnp.asarray(g), key,
                                    cfg=model.cfg, sampling=sampling, pad_id=pad_id,
                                    peft=model.peft)
    yield lo, n, t, g, np.asarray(resp), np.asarray(lengths)


def decode(tokenizer: Any, resp: np.ndarray, lengths: np.ndarray, n: int) -> list[str]:
  """The texts of the first `n` rows of a `generate_rows` batch, each cut at its length."""
  return tokenizer.batch_decode([r[:k].tolist() for r, k in zip(resp[:n], lengths[:n])],
                                skip_special_tokens=True)


def report(result: dict[str, Any], json_path: str = "") -> None:
  """One line `key=value ...` (floats to 4 places) on stdout; the dict as JSON at `json_path`."""
  print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in result.items()), flush=True)
  if json_path:
    with open(json_path, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
