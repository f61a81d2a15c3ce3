"""Supervised fine-tuning (full, LoRA, prompt tuning or adapters by config) entry point.

  python -m experiments.sft --config=configs/sft.py:huanhuan_lora --workdir=runs/sft [--config.x=y] [--resume]
"""

from experiments import launch

if __name__ == "__main__":
  launch.main("sft", "configs/sft.py:huanhuan_lora")
