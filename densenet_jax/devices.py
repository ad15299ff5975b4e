"""Where host data meets the devices: how a batch is divided, and copies to and from them.

`Topology` is computed once per run (`Topology.of_this_process`) and passed to the input
pipeline, which reads from it its share of every batch and the number of steps per epoch.
"""

import collections
import dataclasses
import itertools
import math
from typing import Iterable, Iterator, Optional

import jax
import numpy as np

from densenet_jax import config_validation
from densenet_jax.inference import AXIS_NAME


@dataclasses.dataclass(frozen=True)
class Topology:
  """A global batch divided over processes, then over each process's local devices."""
  global_batch_size: int
  process_index: int = 0
  process_count: int = 1
  local_device_count: int = 1

  def __post_init__(self):
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process_index {self.process_index} is not in [0, {self.process_count})')
    config_validation.check_batch_size('batch_size', self.global_batch_size,
                                       self.process_count * self.local_device_count)

  @classmethod
  def of_this_process(cls, global_batch_size: int) -> 'Topology':
    return cls(global_batch_size, jax.process_index(), jax.process_count(),
               jax.local_device_count())

  @property
  def local_batch_size(self) -> int:
    """This process's share of a global batch."""
    return self.global_batch_size // self.process_count

  def steps_per_epoch(self, num_train: int) -> int:
    """Full global batches in an epoch of num_train examples (the remainder is dropped)."""
    if num_train < self.global_batch_size:
      raise ValueError(f'global batch size {self.global_batch_size} exceeds the {num_train} '
                       'training examples')
    return num_train // self.global_batch_size

  def eval_steps(self, num_examples: int) -> int:
    """Steps that cover num_examples once: the largest process share in local batches."""
    largest_share = math.ceil(num_examples / self.process_count)
    return math.ceil(largest_share / self.local_batch_size)


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _stack_copies(x, copies: int):
  if _is_key(x):
    return jax.random.wrap_key_data(_stack_copies(jax.random.key_data(x), copies))
  return np.stack([np.asarray(x)] * copies)


def replicate(tree, devices: Optional[list] = None):
  """Copies a host pytree to every local device, laid out for jax.pmap (leading device axis)."""
  copies = len(jax.local_devices() if devices is None else devices)
  return jax.tree.map(lambda x: _stack_copies(x, copies), tree)


def _first_copy(x):
  first = x.addressable_data(0)  # a key array's too: no computation over the devices
  if _is_key(x):
    return jax.random.wrap_key_data(np.asarray(jax.random.key_data(first))[0])
  return np.asarray(first).reshape(x.shape[1:])


def unreplicate(tree):
  """The first local device's copy of a replicated pytree, on the host.

  A copy, not `x[0]`: indexing runs a computation over the local devices, and with several
  processes on CPU these per-process collectives were seen to hang (1 run in 6).
  """
  return jax.tree.map(_first_copy, tree)


def prefetch_to_device(iterator: Iterable[dict], size: int = 2,
                       devices: Optional[list] = None) -> Iterator[dict]:
  """Copies batches ahead onto the local devices as arrays `jax.pmap` takes without a copy.

  Each array is sharded along its leading (device) axis over a 1-D mesh of `devices`.
  """
  devices = jax.local_devices() if devices is None else devices
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS_NAME,)),
                                        jax.sharding.PartitionSpec(AXIS_NAME))
  iterator = iter(iterator)
  queue = collections.deque()

  def enqueue(n):
    for batch in itertools.islice(iterator, n):
      queue.append(jax.tree.map(lambda x: jax.device_put(x, sharding), batch))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
