"""Pretraining configs. Use as `--config=configs/pretrain.py:<preset>`; override any field with
`--config.<section>.<field>=value` (an unknown field is an error).

Presets:
  tiny   the README's embedded default: a small code model on the Python standard library's own
         source (no download), a few minutes on 2 CPU cores.
  test   a seconds-long smoke run for tests.
  small  a larger CPU run (hidden 512, 8 layers, GQA).
"""

from ml_collections import ConfigDict

from configs import common


def base_config() -> ConfigDict:
  return ConfigDict(dict(
      stage="pretrain",
      seed=0,
      init="",  # an HF directory or a workdir whose weights start the run ('' = random init)
      model=common.model_config(),
      data=ConfigDict(dict(
          corpus="",  # comma-separated files/dirs/globs; '' = the Python stdlib corpus
          text_field="text",
          stdlib_max_bytes=2_000_000,
          tokenizer="",  # a local HF tokenizer dir; '' = train a byte-level BPE here
          vocab_size=4096,  # of the tokenizer trained here
          tokenizer_train_bytes=2_000_000,
          seq_len=256,
          eval_fraction=0.03,
      )),
      train=common.train_config(),
      optimizer=common.optimizer_config(),
      mesh=common.mesh_config(),
  ))


def _tiny(c: ConfigDict) -> None:
  c.train.update(steps=300, global_batch=8, eval_every=50, log_every=25, checkpoint_every=100,
                 sample_prompts=("def ", "import os\n\nclass "), sample_tokens=48)


def _test(c: ConfigDict) -> None:
  c.model.update(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128)
  c.data.update(stdlib_max_bytes=300_000, vocab_size=512, tokenizer_train_bytes=300_000,
                seq_len=64, eval_fraction=0.05)
  c.train.update(steps=40, global_batch=8, eval_every=20, log_every=10, checkpoint_every=20,
                 max_eval_batches=2, sample_prompts=("def ",), sample_tokens=8)
  c.optimizer.update(lr=3e-3, warmup_steps=5)


def _small(c: ConfigDict) -> None:
  c.model.update(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, mlp_dim=1376)
  c.data.update(vocab_size=8192, stdlib_max_bytes=8_000_000, seq_len=512)
  c.train.update(steps=1000, global_batch=8, eval_every=100, checkpoint_every=250)
  c.optimizer.update(lr=1e-3, warmup_steps=50)


# A third of SmolLM2-135M's depth at its width (63M parameters, 28M of them the tied embedding).
SMOLLM2_THIRD = dict(hidden_size=576, num_layers=10, num_heads=9, num_kv_heads=3, head_dim=64,
                     mlp_dim=1536, rope_theta=100000.0, rms_norm_eps=1e-5, tie_embeddings=True)


def _smollm2_student(c: ConfigDict) -> None:
  # The baseline of configs/distill.py:smollm2_student: the same student, data, rows, steps and
  # optimizer, trained on the text alone (its tokenizer is SmolLM2's, fetched on first use).
  c.model.update(**SMOLLM2_THIRD)
  c.data.update(tokenizer="fetch:smollm2-135m-instruct", seq_len=256)
  c.train.update(steps=150, global_batch=8, eval_every=25, log_every=5, checkpoint_every=50,
                 max_eval_batches=8, sample_prompts=())
  c.optimizer.update(lr=1e-3, warmup_steps=20)


PRESETS = {"tiny": _tiny, "test": _test, "small": _small, "smollm2_student": _smollm2_student}


def get_config(preset: str = "tiny") -> ConfigDict:
  c = base_config()
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} for configs/pretrain.py; choose one of "
                     f"{sorted(PRESETS)}")
  PRESETS[preset](c)
  return c


# Sweeps for `scripts/sweep.py --config=configs/pretrain.py:<preset> --sweep=<name>`; the schema is
# in research/sweeps.py.
SWEEPS = {
    "lr_batch": {"grid": {"optimizer.lr": [1e-3, 3e-3], "train.global_batch": [8, 16]}},
    "lr_warmup_random": {"random": {"n": 8, "params": {
        "optimizer.lr": {"log_uniform": [3e-4, 1e-2]},
        "optimizer.warmup_steps": {"choice": [5, 20, 50]}}}, "seed": 0},
}
