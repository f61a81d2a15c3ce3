"""Pretraining entry point.

  python -m experiments.pretrain --config=configs/pretrain.py:tiny --workdir=runs/x \
      [--config.train.steps=200] [--resume]
"""

import sys

from absl import app
from ml_collections import config_flags

from experiments import launch

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain.py:tiny",
                                          "Config file and preset, e.g. configs/pretrain.py:tiny")


def main(argv):
  del argv
  from research.stages import pretrain  # pylint: disable=import-outside-toplevel
  sys.exit(launch.run_main(pretrain.run, _CONFIG.value))


if __name__ == "__main__":
  app.run(main, flags_parser=launch.parse_flags)
