"""Reward-distribution study: GRPO-family advantages vs the log-reward baseline.

Run it with `python -m experiments.reward_study` (see `run.py`); the report is
docs/reward_study.md.
"""
