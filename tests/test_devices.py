"""devices.py: how a global batch divides over processes and devices, and copies to and from
the devices (8 virtual CPU devices, conftest.py)."""

import jax
import numpy as np
import pytest

from densenet_jax import devices
from densenet_jax.devices import Topology


def test_topology_divides_batches_and_counts_steps():
  topology = Topology(64, process_index=1, process_count=2, local_device_count=8)
  assert topology.local_batch_size == 32
  assert topology.steps_per_epoch(1437) == 22  # the remainder (29 examples) is dropped
  # ceil(ceil(61 / 2) / 32) = 1; ceil(ceil(100 / 2) / 32) = 2
  assert topology.eval_steps(61) == 1 and topology.eval_steps(100) == 2
  with pytest.raises(ValueError, match='global batch size 64 exceeds the 10 training examples'):
    topology.steps_per_epoch(10)
  with pytest.raises(ValueError, match=r'must be a multiple of the device count \(16\)'):
    Topology(24, process_count=2, local_device_count=8)
  with pytest.raises(ValueError, match=r'process_index 2 is not in \[0, 2\)'):
    Topology(16, process_index=2, process_count=2)
  assert Topology.of_this_process(64).local_device_count == jax.local_device_count()


def test_replicate_and_unreplicate_round_trip_keys_and_arrays():
  tree = {'w': np.arange(6.0).reshape(2, 3), 'key': jax.random.key(3), 'step': np.int32(5)}
  replicated = devices.replicate(tree)
  assert replicated['w'].shape == (jax.local_device_count(), 2, 3)
  back = devices.unreplicate(jax.pmap(lambda t: t)(replicated))
  np.testing.assert_array_equal(back['w'], tree['w'])
  assert int(back['step']) == 5
  np.testing.assert_array_equal(jax.random.key_data(back['key']),
                                jax.random.key_data(tree['key']))


def test_prefetch_keeps_the_order_and_shards_the_device_axis():
  count = jax.local_device_count()
  batches = [{'x': np.full((count, 2), i, np.float32)} for i in range(5)]
  fetched = list(devices.prefetch_to_device(iter(batches), size=2))
  assert [int(b['x'][0, 0]) for b in fetched] == list(range(5))
  assert all(len(b['x'].sharding.device_set) == count for b in fetched)
