"""DPO-family preference optimisation (no reward model; full or LoRA by config) entry point.

  python -m experiments.dpo --config=configs/dpo.py:hh_rlhf --workdir=runs/dpo [--config.x=y] [--resume]
"""

from experiments import launch

if __name__ == "__main__":
  launch.main("dpo", "configs/dpo.py:hh_rlhf")
