"""What several test modules share (no test module imports another):

- main.py in subprocesses: `run_main` (a run to its end), `start`/`finish` (the log read as it
  is written, a signal sent once a chosen step is logged), `run_pair` (two processes of one
  multi-host run) and the state a run's last checkpoint holds;
- a run's workdir with random weights, as training leaves it (`write_random_run`);
- a publisher of weights on 127.0.0.1 (`Publisher`, `serve`; conftest.py's `server` fixture)
  and weights files in the publishers' formats (`keras_densenet121_weights`,
  `torchvision_state_dict`, `random_variables`);
- exports loaded where densenet_jax cannot be imported (`run_fresh`) and a Keras export's
  logits (`keras_export_logits`).

The small real tfds datasets the tests build are experiments/tiny_tfds.py's (the experiments
use them too).
"""

import concurrent.futures
import functools
import hashlib
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath

from densenet_jax import checkpoints, costs, models, run_setup, steps, weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = re.compile(r'step (\d+)/\d+ ')
WEIGHTS_BODY = np.random.default_rng(0).bytes(300_000)  # the publisher's /good.bin, /cut.bin
NUM_CLASSES = 10  # random_variables' classifier
DIGITS_STEPS_PER_EPOCH = 1437 // 64  # the digits' 1,437 training images in batches of 64


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


def run_main(args, num_devices, data_dir, timeout=300):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(num_devices))
  proc = subprocess.run([sys.executable, 'main.py', *args, f'--config.data_dir={data_dir}'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return proc.stderr + proc.stdout


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def run_pair(workdir, data_dir, args, sigterm_process_1_at=None):
  """[(exit status, log)] of the two processes of one run."""
  port = free_port()
  procs = [start([*args, f'--config.data_dir={data_dir}', f'--workdir={workdir}',
                            f'--coordinator_address=localhost:{port}', '--num_processes=2',
                            f'--process_id={i}'], num_devices=2) for i in range(2)]
  finish_one = functools.partial(finish, timeout=300)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = [pool.submit(finish_one, procs[0]),
               pool.submit(finish_one, procs[1], signal_at=sigterm_process_1_at,
                           signum=signal.SIGTERM if sigterm_process_1_at else None)]
    return [f.result() for f in futures]



WRITES = ('mkdir', 'write_text', 'write_bytes', 'rename', 'touch')


def fail_writes(monkeypatch, under: str, code: int, methods=WRITES):
  """Makes the writes (epath methods, which orbax and train.py use) below the path prefix
  `under` raise OSError `code`, as a full or read-only file system does."""
  for method in methods:
    original = getattr(epath.gpath._GPath, method)  # pylint: disable=protected-access

    def failing(self, *args, _original=original, **kwargs):
      if os.fspath(self).startswith(under):
        raise OSError(code, os.strerror(code), os.fspath(self))
      return _original(self, *args, **kwargs)

    monkeypatch.setattr(epath.gpath._GPath, method, failing)  # pylint: disable=protected-access


# ---------------------------------------------------------------------------------------------
# Weights, published and in the publishers' formats

class Publisher(http.server.BaseHTTPRequestHandler):
  """Serves /good.bin whole, /cut.bin with its full Content-Length but half its body, and 404
  for anything else; counts requests."""
  requests = []

  def do_GET(self):  # pylint: disable=invalid-name
    Publisher.requests.append(self.path)
    body = self.server.files.get(self.path.lstrip('/'))
    if body is None:
      self.send_error(404)
      return
    self.send_response(200)
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body[:len(body) // 2] if self.path.startswith('/cut') else body)
    self.wfile.flush()

  def log_message(self, *args):
    pass


def serve(server, monkeypatch, key: str, body: bytes) -> weights.Published:
  """Serves `body` as the publisher's file of published weights `key`, whose digest becomes
  body's."""
  spec = weights.PUBLISHED[key]
  server.files[spec.file_name] = body
  digest = hashlib.new(spec.algorithm, body).hexdigest()[:len(spec.digest)]
  monkeypatch.setitem(weights.PUBLISHED, key, weights.Published(spec.url, spec.algorithm, digest,
                                                                spec.model))
  return spec


def keras_densenet121_weights(directory):
  """(bytes of a weights file in the format of Keras's published ones (legacy h5), the Keras
  DenseNet-121 with those random weights)."""
  import keras
  from keras.src.legacy.saving import legacy_h5_format
  import h5py
  model = keras.applications.DenseNet121(weights=None, classifier_activation=None)
  rng = np.random.default_rng(0)
  model.set_weights([rng.normal(size=w.shape).astype(np.float32) * 0.1 + (w == 1)
                     for w in model.get_weights()])
  path = directory / 'served.h5'
  with h5py.File(path, 'w') as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, model)
  return path.read_bytes(), model


def write_random_run(workdir, model, image_shape, step: int, record: dict, rng):
  """A workdir as training leaves it (one checkpoint at `step`, classes.json holding `record`)
  of `model` with random weights, the classifier's too (it starts at zero: every class would
  tie, and any ranking would pass), and random BN statistics, drawn from `rng`. Returns the
  state."""
  tx = steps.sgd_nesterov(optax.constant_schedule(0.1), 0.9, 1e-4)
  state = steps.create_train_state(model, jax.random.key(0), image_shape, tx)
  params = jax.tree.map(lambda x: rng.normal(scale=0.5, size=x.shape).astype(np.float32),
                        state.params)
  batch_stats = jax.tree.map(lambda x: np.abs(rng.normal(size=x.shape)).astype(np.float32) + 0.5,
                             state.batch_stats)
  state = state.replace(step=np.int32(step), params=params, batch_stats=batch_stats)
  ckpt = checkpoints.Checkpoints(os.path.join(workdir, 'checkpoints'))
  ckpt.save(jax.device_get(state),
            {'history': [{'step': step, 'eval': {'test': {'top1_error': 0.5}}}]},
            selection_error=0.5)
  ckpt.close()
  with open(os.path.join(workdir, run_setup.CLASSES_FILE), 'w') as f:
    json.dump(record, f)
  return state


def init(model, rng, x) -> dict:
  """model.init(rng, x), jitted: one compile, where an eager init compiles every operation."""
  return jax.jit(model.init)(rng, x)


_TORCH_MODULES = {'stem_conv': 'features.conv0', 'stem_norm': 'features.norm0',
                  'head_norm': 'features.norm5', 'classifier': 'classifier'}
_TORCH_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                 'var': 'running_var'}


def torch_key(path) -> str:
  """torchvision's current name of one of our variables, path like ('params', 'block1', ...)."""
  _, *module, leaf = path
  joined = '/'.join(module)
  if joined in _TORCH_MODULES:
    name = _TORCH_MODULES[joined]
  elif joined.startswith('block'):
    block, layer, unit, op = module
    number = 1 if unit == 'bottleneck' else 2
    name = f'features.denseblock{block[5:]}.denselayer{layer[5:]}.{op}{number}'
  else:
    transition, _, op = module
    name = f'features.transition{transition[10:]}.{op}'
  return f'{name}.{_TORCH_LEAVES[leaf]}'


def torchvision_state_dict(variables, legacy=False) -> dict:
  """The inverse of from_torchvision, with num_batches_tracked counters like torch's."""
  state_dict = {}
  for path, value in jax.tree.flatten_with_path(variables)[0]:
    path = tuple(k.key for k in path)
    key = torch_key(path)
    if path[-1] == 'kernel':
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    if legacy:  # norm1.weight -> norm.1.weight, as in torchvision's old .pth files
      key = re.sub(r'\.(norm|conv)([12])\.(\w+)$', r'.\1.\2.\3', key)
    state_dict[key] = value
    if key.endswith('running_var'):
      state_dict[key.replace('running_var', 'num_batches_tracked')] = np.array(1000, np.int64)
  return state_dict


def random_variables(name, rng):
  shapes = costs.init_shapes(models.create_model(name, num_classes=NUM_CLASSES), 224)
  return jax.tree.map(
      lambda s: np.abs(rng.normal(size=s.shape)).astype(np.float32), shapes)




# ---------------------------------------------------------------------------------------------
# Exports, loaded as their users load them

def run_fresh(script: str, *args):
  """Runs `script` in a new interpreter whose sys.path has neither the repository nor the
  current directory (-I, cwd elsewhere); the script itself blocks densenet_jax."""
  proc = subprocess.run([sys.executable, '-I', '-c', script, *map(str, args)], cwd='/',
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]


def keras_export_logits(export_dir, images: np.ndarray) -> np.ndarray:
  """The logits of uint8 images from an export's keras.weights.h5, loaded as its classes.json
  says into a new keras.applications.DenseNet121 (classifier_activation=None: logits, where
  softmax probabilities that round to 0 would tie). Keras reads the file alone: nothing of
  densenet_jax takes part."""
  import keras
  with open(os.path.join(export_dir, 'classes.json')) as f:
    meta = json.load(f)
  loader = meta['files']['keras.weights.h5']
  assert loader.startswith('keras.applications.DenseNet121(weights=None, classes=1000)'), loader
  model = keras.applications.DenseNet121(weights=None, classes=1000, classifier_activation=None)
  model.load_weights(os.path.join(export_dir, 'keras.weights.h5'))
  n = meta['eval_transform']['normalization']
  x = (images / n['scale'] - np.array(n['mean'])) / np.array(n['std'])
  return np.asarray(model(x.astype(np.float32), training=False))


def keras_float64_logits(model, x: np.ndarray) -> np.ndarray:
  """The logits of a Keras DenseNet-121 (classifier_activation=None) on inputs x, computed in
  float64: the reference for float32 errors."""
  import keras
  policy = keras.config.dtype_policy()
  keras.config.set_dtype_policy('float64')
  try:
    model64 = keras.applications.DenseNet121(weights=None, classifier_activation=None,
                                             input_shape=model.input_shape[1:])
  finally:
    keras.config.set_dtype_policy(policy)
  model64.set_weights([np.float64(w) for w in model.get_weights()])
  return np.asarray(model64(np.float64(x), training=False))
