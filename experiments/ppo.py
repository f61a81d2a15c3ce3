"""PPO (policy full or LoRA; a reward model or a named reward function) entry point.

  python -m experiments.ppo --config=configs/ppo.py:wordlist --workdir=runs/ppo [--config.x=y] [--resume]
"""

from experiments import launch

if __name__ == "__main__":
  launch.main("ppo", "configs/ppo.py:wordlist")
