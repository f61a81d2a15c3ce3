"""Llama-3-8B LoRA fine-tune on one H100: `scripts/plan.py` plans it; on the hardware,
`python -m experiments.sft --config=configs/plan_llama3_8b_lora.py --config.init=HF_DIR
--config.data.path=DATA --workdir=DIR`.

The frozen base is held in bfloat16 (16 GB); LoRA r=16 on all seven projections trains ~42 M
params, so optimizer state is negligible. Activations decide the batch: 4 micro-batches of 4 rows
of 2048 tokens, full remat per layer.
"""

from ml_collections import ConfigDict

from configs import plan_models, sft


def get_config() -> ConfigDict:
  c = sft.base_config()
  c.model = plan_models.llama3_8b(param_dtype="bfloat16", remat_policy="full")
  c.peft.update(method="lora", r=16, alpha=32.0, dropout=0.05,
                targets=("q", "k", "v", "o", "gate", "up", "down"))
  c.data.update(seq_len=2048)
  c.train.update(steps=1000, global_batch=16, micro_batches=4, eval_every=200)
  c.optimizer.update(lr=2e-4, warmup_steps=50, weight_decay=0.0)
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.plan = plan_models.plan_section(devices=1, accelerator="h100")
  return c
