"""Knowledge distillation (frozen teacher -> student; full or LoRA by config) entry point.

  python -m experiments.distill --config=configs/distill.py:stdlib --config.teacher=DIR --workdir=runs/distill [--resume]
"""

from experiments import launch

if __name__ == "__main__":
  launch.main("distill", "configs/distill.py:stdlib")
