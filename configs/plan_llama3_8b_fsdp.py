"""Llama-3-8B full fine-tune, FSDP over 8 x H100 (one host): `scripts/plan.py` plans it; on the
hardware it runs as `python -m experiments.sft --config=configs/plan_llama3_8b_fsdp.py
--config.init=HF_DIR --config.data.path=DATA --workdir=DIR` (the model then comes from HF_DIR).

float32 master weights and AdamW state sharded 8 ways (16 bytes/param / 8), bfloat16 compute,
full remat per layer: without flash attention a layer's [B, H, T, T] scores dominate, so only the
layer inputs are kept and each layer is recomputed in the backward pass.
"""

from ml_collections import ConfigDict

from configs import plan_models, sft


def get_config() -> ConfigDict:
  c = sft.base_config()
  c.model = plan_models.llama3_8b(param_dtype="float32", remat_policy="full")
  c.peft.method = "none"
  c.data.update(seq_len=4096)
  c.train.update(steps=1000, global_batch=32, micro_batches=4, eval_every=200)
  c.optimizer.update(lr=1e-5, warmup_steps=50)
  c.mesh.update(data=1, fsdp=8, tensor=1)
  c.plan = plan_models.plan_section(devices=8, accelerator="h100")
  return c
