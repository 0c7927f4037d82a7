"""The experiment runner: `build` a run from its config, the `data` stream, the
`warm_start`, the `rl_step`, `evaluate`, the `loop` that ties them to checkpoints and
metrics, and `perf` (hardware rates).
"""
