"""PPO entry point (policy full or LoRA; reward model or a named reward function).

  python -m experiments.ppo --config=configs/ppo.py:wordlist --workdir=runs/ppo \
      [--config.init=WORKDIR_OR_HF_DIR] [--resume]
"""

import sys

from absl import app
from ml_collections import config_flags

from experiments import launch

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ppo.py:wordlist",
                                          "Config file and preset, e.g. configs/ppo.py:wordlist")


def main(argv):
  del argv
  from research.stages import ppo  # pylint: disable=import-outside-toplevel
  sys.exit(launch.run_main(ppo.run, _CONFIG.value))


if __name__ == "__main__":
  app.run(main, flags_parser=launch.parse_flags)
