"""Knowledge-distillation configs: `--config=configs/distill.py:<preset>`.

Presets:
  stdlib  a fresh student (hidden 128, 2 layers) distilled from `teacher` (required: a workdir or
          HF directory, e.g. runs/tiny from the pretraining example) on the Python stdlib corpus.
  huanhuan_onpolicy  on-policy GKD (lmbda 0.5, JSD beta 0.5) on the Zhen Huan SFT records; needs
          `teacher` (e.g. a configs/sft.py:huanhuan_full workdir).
  smollm2_student  SmolLM2-135M-Instruct (fetched) into a fresh 10-layer student of its width on
          the stdlib corpus; configs/pretrain.py:smollm2_student is its text-only baseline.
  test    seconds-long run for tests (needs teacher and data.corpus).

`distill.divergence`: forward_kl (KL(teacher || student)), reverse_kl (KL(student || teacher)) or
jsd (GKD's generalised Jensen-Shannon with `beta`, the teacher's weight in the mixture), on
distributions at `temperature`; `lm_weight` adds the student's LM loss on the data's tokens.

On-policy (GKD, TRL's GKDTrainer): with data.format='sft', `lmbda` is the probability that a
step's responses are the student's own samples from the records' prompts (up to
`max_new_tokens`, at `sample_temperature` with `top_p`/`top_k`; TRL samples at the loss
`temperature`), the loss then on the sampled tokens only; `seq_kd` makes the other steps'
responses the teacher's samples. Which steps sample follows from `seed` and the step alone.
"""

from ml_collections import ConfigDict

from configs import common, pretrain
from configs.sft import peft_config


def base_config() -> ConfigDict:
  return ConfigDict(dict(
      stage="distill",
      seed=0,
      teacher="",  # a workdir or HF directory; frozen, any size the mesh holds
      init="",  # the student: a workdir or HF directory; '' = fresh from `student`
      student=common.model_config(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                  mlp_dim=344),
      peft=peft_config(method="none"),
      data=ConfigDict(dict(
          format="corpus",  # corpus (data.corpus, packed) or sft (data.path, response tokens)
          corpus="",  # '' = the Python stdlib corpus
          text_field="text", stdlib_max_bytes=2_000_000, path="", seq_len=256,
          eval_fraction=0.03)),
      distill=ConfigDict(dict(
          divergence="forward_kl", beta=0.5, temperature=1.0, lm_weight=0.0,
          # On-policy (GKD): the fraction of steps whose responses are the student's samples
          # from the data's prompts (0: off-policy; needs data.format='sft'), and with seq_kd
          # the other steps' responses are the teacher's samples.
          lmbda=0.0, seq_kd=False,
          max_new_tokens=128, sample_temperature=1.0, top_p=1.0, top_k=0)),
      train=common.train_config(steps=300, eval_every=50, log_every=10, sample_prompts=()),
      optimizer=common.optimizer_config(lr=3e-3, warmup_steps=20),
      mesh=common.mesh_config(),
      # How to run a student given by `init`: dtype, remat, attention, ...
      model=common.runtime_config(),
  ))


def _stdlib(c: ConfigDict) -> None:
  del c


def _test(c: ConfigDict) -> None:
  c.student.update(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
  c.data.update(seq_len=32, eval_fraction=0.1)
  c.distill.max_new_tokens = 12
  c.train.update(steps=30, eval_every=15, log_every=5, checkpoint_every=15, max_eval_batches=2)
  c.optimizer.update(lr=1e-2, warmup_steps=2)


def _huanhuan_onpolicy(c: ConfigDict) -> None:
  # GKD's defaults as TRL ships them (lmbda 0.5, beta 0.5, temperature 0.9), on the Zhen Huan
  # SFT records; the teacher (required) is e.g. a configs/sft.py:huanhuan_full workdir.
  c.data.update(format="sft", path=common.repo_data("huanhuan.json"), seq_len=256,
                eval_fraction=0.02)
  c.distill.update(divergence="jsd", beta=0.5, temperature=0.9, lmbda=0.5, max_new_tokens=64,
                   sample_temperature=0.9)


def _smollm2_student(c: ConfigDict) -> None:
  # SmolLM2-135M-Instruct (fetched on first use) into a fresh student of a third of its depth,
  # forward KL on the stdlib corpus; configs/pretrain.py:smollm2_student is the same student on
  # the text alone, for the same steps and tokens (the same rows: same corpus, seq_len and seed).
  base = pretrain.get_config("smollm2_student")
  c.teacher = "fetch:smollm2-135m-instruct"
  c.student.update(**pretrain.SMOLLM2_THIRD)
  c.data.update(seq_len=base.data.seq_len, eval_fraction=base.data.eval_fraction,
                stdlib_max_bytes=base.data.stdlib_max_bytes)
  c.distill.update(divergence="forward_kl", temperature=1.0, lm_weight=0.0)
  c.train.update(**{k: base.train[k] for k in ("steps", "global_batch", "eval_every", "log_every",
                                               "checkpoint_every", "max_eval_batches")})
  c.optimizer.update(**base.optimizer.to_dict())


PRESETS = {"stdlib": _stdlib, "smollm2_student": _smollm2_student,
           "huanhuan_onpolicy": _huanhuan_onpolicy, "test": _test}


def get_config(preset: str = "stdlib") -> ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} for configs/distill.py; choose one of "
                     f"{sorted(PRESETS)}")
  c = base_config()
  PRESETS[preset](c)
  return c


SWEEPS = {
    "divergence": {"grid": {"distill.divergence": ["forward_kl", "reverse_kl", "jsd"],
                            "distill.temperature": [1.0, 2.0]}, "seed": 0},
    # Off-policy, GKD's mix, fully on-policy: for an SFT preset (huanhuan_onpolicy).
    "onpolicy_lmbda": {"grid": {"distill.lmbda": [0.0, 0.5, 1.0]}, "seed": 0},
}
