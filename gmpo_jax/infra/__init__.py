"""What every role leans on: checkpointing (Orbax), preemption, metrics writers, the mesh
and sharding rules, multi-process start-up and compilation caching.
"""
