"""The jitted policy update on a mesh (`update`) and its `jax.pmap` twin (`pmap_update`)."""
