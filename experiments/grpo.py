"""GRPO / DAPO / Dr. GRPO / RLOO (policy full or LoRA; rewards that are code) entry point.

  python -m experiments.grpo --config=configs/grpo.py:arithmetic --workdir=runs/grpo [--config.x=y] [--resume]
"""

from experiments import launch

if __name__ == "__main__":
  launch.main("grpo", "configs/grpo.py:arithmetic")
