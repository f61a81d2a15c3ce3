"""Pretraining entry point.

  python -m experiments.pretrain --config=configs/pretrain.py:tiny --workdir=runs/pretrain [--config.x=y] [--resume]
"""

from experiments import launch

if __name__ == "__main__":
  launch.main("pretrain", "configs/pretrain.py:tiny")
