"""A Llama-3.2-1B-shaped model pretrained on a TPU v5e-64 slice: `scripts/plan.py` plans it on 64
host devices; on the slice every host runs `python -m experiments.pretrain
--config=configs/plan_llama32_1b_v5e.py --config.data.tokenizer=DIR --config.data.corpus=DATA
--workdir=DIR`.

v5e chips have 16 GB: weights + AdamW (16 bytes/param, 20 GB in all) are sharded 16 ways (fsdp)
and replicated over 4 data groups; 1M-token batches (512 rows of 2048) in 4 micro-batches.
bfloat16 compute; remat `dots_no_batch` keeps the weight matmuls' outputs and recomputes the
attention and elementwise work (see README planning table for the alternatives).
"""

from ml_collections import ConfigDict

from configs import plan_models, pretrain


def get_config() -> ConfigDict:
  c = pretrain.base_config()
  c.model = plan_models.llama32_1b(param_dtype="float32", remat_policy="dots_no_batch")
  c.data.update(seq_len=2048)
  c.train.update(steps=20000, global_batch=512, micro_batches=4, eval_every=1000,
                 checkpoint_every=1000)
  c.optimizer.update(lr=3e-4, warmup_steps=1000, weight_decay=0.1)
  c.mesh.update(data=4, fsdp=16, tensor=1)
  c.plan = plan_models.plan_section(devices=64, accelerator="v5e")
  return c
