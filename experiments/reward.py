"""Reward model (rank loss; full or LoRA by config) entry point.

  python -m experiments.reward --config=configs/reward.py:hh_rlhf --workdir=runs/reward [--config.x=y] [--resume]
"""

from experiments import launch

if __name__ == "__main__":
  launch.main("reward", "configs/reward.py:hh_rlhf")
