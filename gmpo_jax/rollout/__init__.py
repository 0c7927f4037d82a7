"""Generation: the KV-cache sampler (`sampling`), rollout backends behind one small
interface (`backends`) and the asynchronous producer that runs a sampler ahead of the
learner (`producer`).
"""
