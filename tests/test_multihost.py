"""Two processes on this machine (jax.distributed on localhost, CPU collectives), each with 2 CPU
devices and its own data shard, compute what one process with 4 devices computes on the same
global batches: the real input pipeline, model and pmapped train step of
experiments/multihost_drift.py's workers, in float64.

In float32 the two processes' other all-reduce order is rounding that training amplifies (to
1e-4 in 48 steps), and a tolerance for it rests on controls that other innocent changes move. In
float64 the same order costs a few units in the last place (measured 2e-16 after 48 steps, jax
0.10 and 0.12: docs/performance.md), while a process reading another's shard or BN statistics
per process move the parameters by ~1e-3: the tolerance below cannot be met by such a bug nor
missed without one.

(main.py in two processes, float32, stopped by SIGTERM and resumed: test_main.py.)
"""

import numpy as np
import pytest

from experiments import multihost_drift, tiny_tfds

# 4 of an epoch's 12 steps, at a constant learning rate (the decay is at 2.5 epochs). The float64
# steps are most of the test's time; after 4 the planted bugs are ~1e-3 away, the two processes
# ~1e-16 (measured: docs/performance.md).
STEPS = 4


@pytest.mark.slow
def test_two_processes_compute_what_one_process_computes_in_float64(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  num_train = multihost_drift.NUM_TRAIN
  tiny_tfds.store('cifar10', data_dir, {'train': (np.arange(num_train), np.arange(num_train) % 10),
                                         'test': (np.arange(1000, 1010), np.arange(10))})
  one, two = str(tmp_path / 'one.npz'), str(tmp_path / 'two.npz')
  # The reference, the control (its batches rotated by one device: another all-reduce order),
  # and the two planted bugs, in one process; the two processes at the same time.
  runs = ('roll0', 'roll1', 'one_shard', 'bn_per_process')
  pair = multihost_drift.launch(two, 'float64', 2, data_dir, steps=STEPS)
  single = multihost_drift.launch(one, 'float64', 1, data_dir, runs=runs, steps=STEPS)
  assert multihost_drift.wait(pair)['devices'] == 4
  assert multihost_drift.wait(single)['devices'] == 4
  one, two = np.load(one), np.load(two)
  reference = one[f'roll0_params_{STEPS}']
  distance = lambda params: float(np.abs(params - reference).max())

  # The noise floor: the control's distance, and at least one float64 ulp of the largest
  # parameter (should another all-reduce order ever round alike).
  floor = max(distance(one[f'roll1_params_{STEPS}']),
              np.finfo(np.float64).eps * float(np.abs(reference).max()))
  tolerance = 100 * floor
  assert floor < 1e-12, floor  # float64 rounding, not float32's (~1e-7)
  assert distance(two[f'roll0_params_{STEPS}']) <= tolerance, (distance(two[f'roll0_params_{STEPS}']), floor)
  np.testing.assert_allclose(two['roll0_losses'], one['roll0_losses'], rtol=1e-12)
  for bug in ('one_shard', 'bn_per_process'):
    assert distance(one[f'{bug}_params_{STEPS}']) > 10 * tolerance, (bug, distance(
        one[f'{bug}_params_{STEPS}']), tolerance)
