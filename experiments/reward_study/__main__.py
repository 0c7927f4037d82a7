"""Entry point: python -m experiments.reward_study [--quick] [--out DIR]."""

from experiments.reward_study import run

if __name__ == '__main__':
  run.main()
