"""DPO-family configs: `--config=configs/dpo.py:<preset>`.

Presets:
  hh_rlhf  DPO (sigmoid, beta 0.1) with LoRA r=8 on data/hh_rlhf_harmless_test_500.jsonl,
           100 pairs held out, the reference precomputed; with no `init` it first pretrains a small
           base on every training completion (chosen and rejected alike, so it prefers neither).
  hh_rlhf_smollm2  the same from SmolLM2-135M-Instruct (fetched on first use), 64 pairs held out.
  test     seconds-long full fine-tune for tests (needs data.path).

`dpo.loss`: sigmoid (DPO; with label_smoothing, conservative DPO), ipo, hinge, simpo
(reference-free, length-normalised, target margin `gamma`), orpo (odds ratio + SFT, no reference).
`dpo.beta` is DPO's KL strength (IPO's tau), SimPO's reward scale (about 2), ORPO's lambda (0.1).
"""

from ml_collections import ConfigDict

from configs import common
from configs.reward import _base_pretrain_config
from configs.sft import peft_config


def base_config() -> ConfigDict:
  return ConfigDict(dict(
      stage="dpo",
      seed=0,
      init="",  # an SFT/pretrain workdir or HF directory; '' = build a small base first
      peft=peft_config(method="none"),
      # chat_template, eval_fold: as in configs/reward.py.
      data=ConfigDict(dict(path="", max_len=256, eval_count=100, eval_fold=0,
                           long_prompts="error", chat_template=False)),
      dpo=ConfigDict(dict(
          loss="sigmoid", beta=0.1, label_smoothing=0.0, gamma=0.5,
          # The reference's log-probs of every pair, once before training (one model in memory);
          # False: LoRA reads the base with the adapter off, a full fine-tune a frozen copy.
          precompute_reference=True)),
      base=_base_pretrain_config(),
      train=common.train_config(steps=300, global_batch=8, eval_every=50, log_every=10,
                                eval_batch_size=8, max_eval_batches=13),
      optimizer=common.optimizer_config(lr=5e-5, warmup_steps=20, weight_decay=0.0),
      mesh=common.mesh_config(),
      # How to run the model `init` (or the base built here) gives: dtype, remat, attention, ...
      model=common.runtime_config(),
  ))


def _hh_rlhf(c: ConfigDict) -> None:
  c.data.update(path=common.repo_data("hh_rlhf_harmless_test_500.jsonl"), long_prompts="truncate")
  c.peft.update(method="lora", r=8, alpha=16.0, dropout=0.0,
                targets=("q", "k", "v", "o", "gate", "up", "down"))
  c.optimizer.lr = 3e-4
  c.train.update(steps=150, eval_every=25)


def _hh_rlhf_smollm2(c: ConfigDict) -> None:
  # From SmolLM2-135M-Instruct (fetched on first use), LoRA on the same 64 held-out pairs as
  # configs/reward.py:hh_rlhf_smollm2; sized for 2 CPU cores: 60 steps of 8 pairs (1.1 passes over
  # the 436 training pairs), each step forwarding 16 rows of up to 256 tokens.
  _hh_rlhf(c)
  c.init = "fetch:smollm2-135m-instruct"
  c.data.update(max_len=256, eval_count=64)
  c.optimizer.update(lr=2e-4, warmup_steps=5)
  c.train.update(steps=60, global_batch=8, eval_every=20, checkpoint_every=20, max_eval_batches=8)


def _test(c: ConfigDict) -> None:
  c.data.update(max_len=32, eval_count=8, long_prompts="truncate")
  c.dpo.beta = 0.5
  c.base.model.update(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
  c.base.data.update(vocab_size=400, seq_len=32)
  c.base.train.update(steps=10, eval_every=0, checkpoint_every=10, sample_prompts=())
  c.base.optimizer.update(warmup_steps=2)
  c.train.update(steps=20, eval_every=10, log_every=5, checkpoint_every=10, max_eval_batches=1)
  c.optimizer.update(lr=3e-3, warmup_steps=2)


PRESETS = {"hh_rlhf": _hh_rlhf, "hh_rlhf_smollm2": _hh_rlhf_smollm2, "test": _test}


def get_config(preset: str = "hh_rlhf") -> ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} for configs/dpo.py; choose one of "
                     f"{sorted(PRESETS)}")
  c = base_config()
  PRESETS[preset](c)
  return c


# `scripts/sweep.py --config=configs/dpo.py:hh_rlhf --sweep=beta_loss` (schema: research/sweeps.py).
SWEEPS = {
    "beta_loss": {"grid": {"dpo.beta": [0.05, 0.1, 0.3], "dpo.loss": ["sigmoid", "ipo"]},
                  "seed": 0},
}
