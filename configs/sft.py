"""Supervised fine-tuning configs: `--config=configs/sft.py:<preset>`.

Presets:
  huanhuan_lora  LoRA SFT on data/huanhuan.json (r=8, alpha=32, dropout 0.1, all seven
                 projections, as the self-llm Llama-3 tutorial); with no `init` it first pretrains
                 a small base (tokenizer included) on the training records' text.
  huanhuan_full  the same data, full fine-tuning.
  huanhuan_lora_smollm2  the same LoRA on SmolLM2-135M-Instruct (fetched on first use, see
                 scripts/fetch_model.py), prompts in its own ChatML template; CPU-sized.
  test           seconds-long LoRA run for tests (needs data.path).
"""

from ml_collections import ConfigDict

from configs import common, pretrain


def peft_config(**overrides) -> ConfigDict:
  """Fields of research.models.peft.PeftConfig."""
  c = ConfigDict(dict(method="lora", r=8, alpha=16.0, dropout=0.0, targets=("q", "v"),
                      rslora=False, num_virtual_tokens=0, adapter_dim=0,
                      param_dtype="float32"))
  c.update(overrides)
  return c


def _base_pretrain_config() -> ConfigDict:
  c = pretrain.get_config("tiny")
  c.model.update(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=688)
  c.data.update(vocab_size=6000, tokenizer_train_bytes=4_000_000, seq_len=256, eval_fraction=0.02)
  c.train.update(steps=300, eval_every=100, checkpoint_every=150, sample_prompts=("嬛嬛",),
                 sample_tokens=24)
  return c


def base_config() -> ConfigDict:
  return ConfigDict(dict(
      stage="sft",
      seed=0,
      init="",  # a workdir or HF directory to fine-tune; '' = build a small base first (see base)
      peft=peft_config(),
      data=ConfigDict(dict(
          path="",  # json / jsonl / parquet files (alpaca or chat records), comma-separated
          format="auto",
          seq_len=256,  # rows; an example may hold seq_len + 1 tokens
          pack=True,
          overflow="truncate_prompt_left",  # or "drop"
          eval_fraction=0.05,
      )),
      # Used only when `init` is empty: the pretraining config of a small base model trained on
      # the records' text (its corpus is filled in at run time).
      base=_base_pretrain_config(),
      train=common.train_config(steps=200, eval_every=50, log_every=10, sample_tokens=40),
      optimizer=common.optimizer_config(lr=1e-3, warmup_steps=10, weight_decay=0.0),
      mesh=common.mesh_config(),
      # How to run the model `init` (or the base built here) gives: dtype, remat, attention, ...
      model=common.runtime_config(),
  ))


def _huanhuan_lora(c: ConfigDict) -> None:
  c.data.path = common.repo_data("huanhuan.json")
  c.peft.update(method="lora", r=8, alpha=32.0, dropout=0.1,
                targets=("q", "k", "v", "o", "gate", "up", "down"))


def _huanhuan_lora_smollm2(c: ConfigDict) -> None:
  _huanhuan_lora(c)
  c.init = "fetch:smollm2-135m-instruct"
  c.data.update(seq_len=256, eval_fraction=0.02)
  # Sized for 2 CPU cores: 360 steps of 4 packed rows x 256 tokens (1.85 examples a row, so about
  # 2,660 of the 3,643 examples), about 5.5 s a step on quiet cores. Held-out loss falls with the
  # number of updates more than with their size, so rows are few and the rate high
  # (docs/results.md has the schedules measured).
  c.optimizer.update(lr=2e-3, warmup_steps=10)
  c.train.update(steps=360, global_batch=4, eval_every=60, max_eval_batches=2,
                 checkpoint_every=120, sample_tokens=32)


def _huanhuan_full(c: ConfigDict) -> None:
  _huanhuan_lora(c)
  c.peft.method = "none"
  c.optimizer.lr = 3e-4


def _test(c: ConfigDict) -> None:
  c.peft.update(method="lora", r=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
  c.data.update(seq_len=64, eval_fraction=0.1)
  c.base.model.update(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128)
  c.base.data.update(vocab_size=600, seq_len=64)
  c.base.train.update(steps=20, eval_every=0, checkpoint_every=20, sample_tokens=4)
  c.base.optimizer.update(warmup_steps=2)
  c.train.update(steps=30, eval_every=15, log_every=10, checkpoint_every=15, max_eval_batches=2,
                 sample_tokens=8)
  c.optimizer.update(lr=3e-3, warmup_steps=2)


PRESETS = {"huanhuan_lora": _huanhuan_lora, "huanhuan_full": _huanhuan_full,
           "huanhuan_lora_smollm2": _huanhuan_lora_smollm2, "test": _test}


def get_config(preset: str = "huanhuan_lora") -> ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} for configs/sft.py; choose one of "
                     f"{sorted(PRESETS)}")
  c = base_config()
  PRESETS[preset](c)
  return c


# Sweeps for `scripts/sweep.py --config=configs/sft.py:<preset> --sweep=<name>` (schema in
# research/sweeps.py). Pass `--extra='--config.init=DIR'` so trials share one base model instead of
# each building its own.
SWEEPS = {
    "lr_rank": {"grid": {"optimizer.lr": [1e-4, 3e-4], "peft.r": [4, 8]}, "seed": 0},
}
