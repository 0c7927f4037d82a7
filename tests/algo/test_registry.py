"""The name registries: filled by decorator at import, read-only after."""

import functools

import pytest

from gmpo_jax.algo import advantages, losses, registry


def _scaled(x, *, scale, offset=0.0, batch_weights=None):
  del batch_weights
  return x * scale + offset


def test_register_then_freeze():
  table = registry.Registry('test function', per_call=frozenset({'batch_weights'}))
  assert table.register('scaled')(_scaled) is _scaled
  with pytest.raises(ValueError, match="'scaled' is registered twice"):
    table.register('scaled')(_scaled)
  table.freeze()
  with pytest.raises(RuntimeError, match="frozen.*'late'"):
    table.register('late')(_scaled)
  assert dict(table) == {'scaled': _scaled} and len(table) == 1
  with pytest.raises(TypeError):
    table['other'] = _scaled  # a Mapping, not a dict


def test_bind_checks_names_and_hyperparameters():
  table = registry.Registry('test function', per_call=frozenset({'batch_weights'}))
  table.register('scaled')(_scaled)
  bound = table.bind('scaled', scale=3.0)
  assert isinstance(bound, functools.partial) and bound(2.0) == 6.0
  with pytest.raises(ValueError, match=r"Unknown test function 'shifted'.*\['scaled'\]"):
    table.bind('shifted')
  with pytest.raises(ValueError, match=r"needs hyperparameter\(s\) \['scale'\]"):
    table.bind('scaled', offset=1.0)
  # Per-call data is neither a hyperparameter nor required.
  with pytest.raises(ValueError, match=r"\['batch_weights'\].*valid: \['scale', 'offset'\]"):
    table.bind('scaled', scale=1.0, batch_weights=None)


@pytest.mark.parametrize('table', [advantages.ADVANTAGE_ESTIMATORS, losses.POLICY_LOSSES])
def test_the_algorithm_registries_are_frozen_after_import(table):
  with pytest.raises(RuntimeError, match='frozen'):
    table.register('late')(_scaled)
  assert 'late' not in table
