"""Supervised fine-tuning entry point (full, LoRA, prompt tuning or adapters by config).

  python -m experiments.sft --config=configs/sft.py:huanhuan_lora --workdir=runs/huanhuan \
      [--config.init=WORKDIR_OR_HF_DIR] [--resume]
"""

import sys

from absl import app
from ml_collections import config_flags

from experiments import launch

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sft.py:huanhuan_lora",
                                          "Config file and preset, e.g. configs/sft.py:huanhuan_lora")


def main(argv):
  del argv
  from research.stages import sft  # pylint: disable=import-outside-toplevel
  sys.exit(launch.run_main(sft.run, _CONFIG.value))


if __name__ == "__main__":
  app.run(main, flags_parser=launch.parse_flags)
