"""Llama-3-70B (continued) pretraining on a TPU v5p-128 slice: 128 TensorCores = 64 chips = 64
JAX devices on 16 hosts. `scripts/plan.py` plans it on 64 host devices; on the slice every host
runs the same `python -m experiments.pretrain --config=configs/plan_llama3_70b_v5p.py
--config.data.tokenizer=DIR --config.data.corpus=DATA --workdir=DIR` (see docs/planning.md).

Mesh fsdp=16 x tensor=4: weights and AdamW state sharded 64 ways (16 bytes/param -> ~17.6 GB per
chip); heads and MLP split over 4 chips, so each chip holds a quarter of every layer's attention
scores. 1M-token batches (256 rows of 4096) in 8 micro-batches; bfloat16 compute, full remat.
"""

from ml_collections import ConfigDict

from configs import plan_models, pretrain


def get_config() -> ConfigDict:
  c = pretrain.base_config()
  c.model = plan_models.llama3_70b(param_dtype="float32", remat_policy="full")
  c.data.update(seq_len=4096)
  c.train.update(steps=10000, global_batch=256, micro_batches=8, eval_every=500,
                 checkpoint_every=500)
  c.optimizer.update(lr=1.5e-4, warmup_steps=500, weight_decay=0.1)
  c.mesh.update(data=1, fsdp=16, tensor=4)
  c.plan = plan_models.plan_section(devices=64, accelerator="v5p")
  return c
