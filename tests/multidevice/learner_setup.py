"""Inputs shared by the multi-device learner tests: a tiny policy, a rollout batch, the
runner's optimizer and the real GMPO learner loss, wired by the runner's own functions
(`rl_step.rollout_batch`, `learner.init_opt_state`, `learner.make_update_fn`,
`learner.place_batch`), so the tests check the code the runner runs."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gmpo_jax.config import AlgorithmConfig
from gmpo_jax.infra import sharding
from gmpo_jax.learner import pmap_update as pmap_step
from gmpo_jax.learner import update as learner
from gmpo_jax.models import lora
from gmpo_jax.models.logprobs import positions_from_mask
from gmpo_jax.models.transformer import Transformer, TransformerConfig
from gmpo_jax.rollout.backends import Rollout
from gmpo_jax.runner import build, rl_step

# 'tiny' divides evenly on every test mesh: vocab 128, embed 64 (fsdp <= 4), 4 heads and
# 2 KV heads, MLP 128 (tensor <= 2); so every logical rule really shards.
MODEL = TransformerConfig.from_name("tiny")
B, G, T = 8, 4, 12  # 8 prompts x 4 completions = 32 sequences of 12 tokens.
N = B * G
NUM_STEPS = 3
ALGO = AlgorithmConfig(
    advantage="gmpo",
    advantage_kwargs=(("normalize", True),),
    objective="geometric",
    beta=0.05,
    num_microbatches=2,
)
# The runner's optimizer (global-norm clip, AdamW, warmup + cosine) with the default config's
# hyperparameters, short warmup so that every step moves the parameters.
OPTIM = ml_collections.ConfigDict(
    dict(
        learning_rate=1e-3,
        warmup_steps=1,
        end_lr_fraction=0.1,
        max_grad_norm=1.0,
        b1=0.9,
        b2=0.99,
        weight_decay=0.01,
    )
)


def model(lora_config=None):
  """(graphdef, params) of the tiny policy at a fixed initialisation, with `lora_config`'s
  adapters attached (the base frozen) when one is given."""
  policy = Transformer(MODEL, rngs=nnx.Rngs(0))
  if lora_config is not None:
    policy = lora.apply_lora(policy, lora_config, seed=0)
  return nnx.split(policy)


def optimizer():
  return build.make_optimizer(OPTIM, total_updates=10)


def micro_loss(algo=ALGO):
  return build.policy_loss(algo, temperature=1.0, chunk_size=4, max_length=T)


def rollout(seed):
  """A rollout-shaped batch (NumPy): sequences [N, T], rewards and group mask [B, G].

  Prompts of 2-4 tokens, completions of 1-7 (some rows end in padding), old log-probs near the
  random policy's -log V so that some GMPO ratios leave the clip range, the sampler's
  log-probs 0.3 (std) away from them, positive graded rewards; group 3 is dropped (dynamic
  sampling) and one completion of group 5 is masked.
  """
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, MODEL.vocab_size, (N, T)).astype(np.int32)
  prompt = rng.integers(2, 5, N)
  length = prompt + rng.integers(1, T - 4, N)
  cols = np.arange(T)[None]
  key_mask = cols < length[:, None]
  loss_mask = key_mask & (cols >= prompt[:, None])
  old_logp = np.where(loss_mask, rng.normal(-np.log(MODEL.vocab_size), 0.3, (N, T)), 0.0)
  ref_logp = np.where(loss_mask, old_logp + rng.normal(0.0, 0.1, (N, T)), 0.0)
  behav_logp = np.where(loss_mask, old_logp + rng.normal(0.0, 0.3, (N, T)), 0.0)
  group_mask = np.ones((B, G), bool)
  group_mask[3] = False
  group_mask[5, 1] = False
  return dict(
      tokens=tokens,
      positions=np.asarray(positions_from_mask(jnp.asarray(key_mask))),
      key_mask=key_mask,
      loss_mask=loss_mask,
      old_logp=old_logp.astype(np.float32),
      ref_logp=ref_logp.astype(np.float32),
      behav_logp=behav_logp.astype(np.float32),
      rewards=rng.lognormal(0.0, 1.0, (B, G)).astype(np.float32),
      group_mask=group_mask,
  )


@functools.cache
def _advantage_fn():
  return jax.jit(build.advantage_fn(ALGO))


def learner_batch(data, num_microbatches, algo=ALGO):
  """The runner's learner input for `data` (`rl_step.rollout_batch`): advantages of the whole
  batch, the masked completions out of the loss, the sampler's log-probs with an importance
  correction, as [num_microbatches, N / num_microbatches, ...]."""
  advantages = _advantage_fn()(jnp.asarray(data["rewards"]), jnp.asarray(data["group_mask"]))
  # Only the sequence fields of a Rollout enter the learner's batch.
  sequences = Rollout(
      tokens=data["tokens"],
      positions=data["positions"],
      key_mask=data["key_mask"],
      completion_mask=data["loss_mask"],
      logprobs=None,
      policy_logprobs=None,
      lengths=None,
      finished=None,
  )
  batch = rl_step.rollout_batch(
      sequences,
      advantages=advantages,
      group_mask=data["group_mask"],
      old_logp=data["old_logp"],
      ref_logp=data["ref_logp"],
      behav_logp=data["behav_logp"] if algo.is_correction != "none" else None,
  )
  return jax.tree.map(lambda x: learner.to_microbatches(x, num_microbatches), batch)


@functools.cache
def mesh_run(
    mesh_shape,
    num_microbatches=ALGO.num_microbatches,
    in_mesh_context=False,
    algo=ALGO,
    parallelism="mesh",
    lora_config=None,
):
  """NUM_STEPS updates of the Mesh path as the runner wires it (see test_mesh_equivalence).

  Args:
    mesh_shape: (data, fsdp, tensor) over the 8 devices, or None for one device.
    num_microbatches: micro-batches per update.
    in_mesh_context: run the updates under `jax.set_mesh(mesh)`, as `train_and_evaluate`
      does, so the model's activations are constrained to the batch axes.
    algo: the algorithm (its objective and importance correction).
    parallelism: 'mesh', or 'pmap' for the runner's `pmap_step` update over the mesh's devices.
    lora_config: a `lora.LoRAConfig`: the update trains its adapters only, as a LoRA run's does.

  Returns:
    dict: `outputs` and `states` ((params, opt_state)) after every step, as NumPy; the live
    final `params` and `opt_state`, their expected shardings, and the number of compiles.
  """
  if mesh_shape is None:
    mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
  else:
    data, fsdp, tensor = mesh_shape
    mesh = sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor)
  graphdef, params = model(lora_config)
  opt = optimizer()
  param_shardings = sharding.state_shardings(params, mesh)
  params = jax.device_put(params, param_shardings)
  opt_state = learner.init_opt_state(
      opt, params if lora_config is None else lora.split_adapters(params)[0], mesh
  )
  opt_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
  if parallelism == "pmap":  # the runner's pmap path trains every parameter
    assert lora_config is None
    build = functools.partial(pmap_step.make_pmap_update_fn, devices=list(mesh.devices.flat))
  else:
    trainable = None if lora_config is None else lora.LoRAParam
    build = functools.partial(learner.make_update_fn, trainable=trainable)
  update = build(
      graphdef, opt, micro_loss(algo), param_shardings=param_shardings, opt_shardings=opt_shardings
  )
  outputs, states = [], []
  with jax.set_mesh(mesh) if in_mesh_context else contextlib.nullcontext():
    for step in range(NUM_STEPS):
      batch = learner.place_batch(learner_batch(rollout(seed=step), num_microbatches, algo), mesh)
      params, opt_state, out = update(params, opt_state, batch)
      outputs.append(jax.device_get(out))
      states.append(jax.device_get((params, opt_state)))
  return dict(
      outputs=outputs,
      states=states,
      params=params,
      opt_state=opt_state,
      param_shardings=param_shardings,
      opt_shardings=opt_shardings,
      compiles=update._cache_size(),
  )  # pylint: disable=protected-access


def adam_first_moment(opt_state):
  """Adam's first moment: make_optimizer = chain(clip_by_global_norm, adamw)."""
  return opt_state[1][0].mu


def assert_trees_close(actual, expected, *, rtol=1e-5, atol=1e-5):
  """Every leaf of `actual` equals `expected`'s to float32 rounding; the trees match."""
  jax.tree.map(
      lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol),
      actual,
      expected,
  )
