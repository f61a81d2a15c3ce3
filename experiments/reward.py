"""Reward-model entry point (rank loss; full or LoRA by config).

  python -m experiments.reward --config=configs/reward.py:hh_rlhf --workdir=runs/rm \
      [--config.init=WORKDIR_OR_HF_DIR] [--resume]
"""

import sys

from absl import app
from ml_collections import config_flags

from experiments import launch

_CONFIG = config_flags.DEFINE_config_file("config", "configs/reward.py:hh_rlhf",
                                          "Config file and preset, e.g. configs/reward.py:hh_rlhf")


def main(argv):
  del argv
  from research.stages import reward  # pylint: disable=import-outside-toplevel
  sys.exit(launch.run_main(reward.run, _CONFIG.value))


if __name__ == "__main__":
  app.run(main, flags_parser=launch.parse_flags)
