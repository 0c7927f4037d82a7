"""The algorithm's math: advantages, policy objectives, KL, importance weights, reward
shape diagnostics and pass@k. Pure functions of arrays: no model, no config, no I/O.
"""
