"""main.py in subprocesses for the fault and multi-host tests: the log read as it is written,
a signal sent once a chosen step is logged, and the state a run's last checkpoint holds."""

import os
import re
import subprocess
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = re.compile(r'step (\d+)/\d+ ')


def start(args, num_devices: int) -> subprocess.Popen:
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(num_devices))
  return subprocess.Popen([sys.executable, 'main.py', *args], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, signal_at: int = None, signum: int = None,
           timeout: float = 300, target: subprocess.Popen = None):
  """(exit status, log) of proc; sends `signum` to `target` (default proc) once proc logs a
  step >= signal_at. The process is killed after `timeout` seconds."""
  watchdog = threading.Timer(timeout, proc.kill)
  watchdog.start()
  lines = []
  try:
    for line in proc.stdout:
      lines.append(line)
      match = STEP.search(line)
      if signum is not None and match and int(match.group(1)) >= signal_at:
        (target or proc).send_signal(signum)
        signum = None
    proc.wait()
  finally:
    watchdog.cancel()
  return proc.returncode, ''.join(lines)


def complete_steps(workdir: str) -> list:
  """Steps of the complete checkpoints (orbax renames a checkpoint to its step when done)."""
  names = os.listdir(os.path.join(workdir, 'checkpoints'))
  return sorted(int(name) for name in names if name.isdigit())


def last_checkpoint(workdir: str):
  """(step, state tree of numpy arrays, record) of the latest checkpoint of workdir."""
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  item_names=('state', 'record'))
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), record=ocp.args.JsonRestore()))
  manager.close()
  return step, jax.tree.map(np.asarray, restored['state']), restored['record']


def assert_bitwise_equal(a, b):
  leaves_a, leaves_b = (jax.tree.leaves_with_path(t) for t in (a, b))
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  different = [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(leaves_a, leaves_b)
               if x.dtype != y.dtype or not np.array_equal(x, y)]
  assert not different, f'{len(different)} arrays differ, e.g. {different[:3]}'
