"""A Llama-3.2-1B-shaped model pretrained on a TPU v5e-64 slice (64 chips, 8 hosts):
`scripts/plan.py` plans it on 64 host devices; on the slice every host runs the same
`python -m experiments.pretrain --config=configs/plan_llama32_1b_v5e.py
--config.data.tokenizer=DIR --config.data.corpus=DATA --workdir=DIR` (see docs/planning.md).

v5e chips have 16 GiB. Weights + AdamW are 16 bytes/param (20 GB): split 4 ways by tensor
parallelism (heads, MLP and the 128k vocabulary, so the logits are split too) and replicated over
16 data groups; 1M-token batches (512 rows of 2048) in 8 micro-batches of 4 rows per group.
bfloat16 compute; remat `dots_no_batch` keeps the weight matmuls' outputs and recomputes attention
and elementwise work, so the big matmuls are not recomputed. The plan's figures are in
docs/planning.md.
"""

from ml_collections import ConfigDict

from configs import plan_models, pretrain


def get_config() -> ConfigDict:
  c = pretrain.base_config()
  c.model = plan_models.llama32_1b(param_dtype="float32", remat_policy="dots_no_batch")
  c.data.update(seq_len=2048)
  c.train.update(steps=20000, global_batch=512, micro_batches=8, eval_every=1000,
                 checkpoint_every=1000)
  c.optimizer.update(lr=3e-4, warmup_steps=1000, weight_decay=0.1)
  c.mesh.update(data=16, fsdp=1, tensor=4)
  c.plan = plan_models.plan_section(devices=64, accelerator="v5e")
  return c
