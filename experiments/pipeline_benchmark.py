"""Host cost of the input pipeline per image, this checkout against an earlier one and torchvision.

Per case (decode + preprocess + batch, through `input_pipeline.example_preprocessor`):
  CPU-ms per image   process CPU time over images, on one thread and on all cores (the figure
                     other load on the machine barely changes), and wall images/s on all cores
  host -> device     bytes per example of what the pipeline yields (image, label, epoch, index)
Images: CIFAR as 32x32 PNG crops of scikit-learn's two sample photos (tfds stores CIFAR as PNG);
ImageNet as the two 427x640 photos as JPEGs (ImageNet's average is about 400x350), through
fb.resnet.torch's training transform and the evaluation resize + center crop.

  python experiments/pipeline_benchmark.py [--before REV] [--torchvision-python PATH]

--before REV: the same cases with the input pipeline of git revision REV (extracted to a
temporary folder), each side in its own process. --torchvision-python: the ImageNet cases
with torchvision's transforms.v2 on PIL on the same JPEG files, in that interpreter (a venv with
torch and torchvision, experiments/torchvision_pipeline.py). Also prints the host memory of the
shuffle buffers, which hold encoded bytes.
"""

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image
from sklearn import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 128
# (label, dataset, images, count on one thread, train)
CASES = (('CIFAR train', 'cifar10', 'cifar', 10_000, True),
         ('ImageNet train', 'imagenet2012', 'jpegs', 400, True),
         ('ImageNet eval', 'imagenet2012', 'jpegs', 400, False))
IMAGENET_MEAN_JPEG_BYTES = 110_000  # ImageNet's training JPEGs: ~140 GB / 1.28 M


def encode(image, image_format):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format=image_format, quality=90)
  return buffer.getvalue()


def images() -> dict:
  photos = datasets.load_sample_images().images
  rng = np.random.default_rng(0)
  return {'cifar': [encode(photo[y:y + 32, x:x + 32], 'PNG') for photo in photos
                    for y, x in rng.integers(0, 427 - 32, (256, 2))],
          'jpegs': [encode(photo, 'JPEG') for photo in photos]}


def measure(name, encoded, count, train, threads) -> dict:
  """Runs in the process of the code measured (this checkout's or --before's)."""
  import tensorflow as tf

  from densenet_jax import datasets, input_pipeline, runtime
  runtime.keep_tensorflow_off_accelerators()
  spec = datasets.SPECS[name]
  view = input_pipeline.host_view(datasets.DataOptions(name), spec)
  preprocess = input_pipeline.example_preprocessor(spec, view, train=train, seed=0)
  encoded = [encoded[i % len(encoded)] for i in range(count)]
  examples = tf.data.Dataset.from_tensor_slices({
      'image': encoded, 'label': np.zeros(count, np.int32),
      'index': np.arange(count, dtype=np.int64), 'epoch': np.zeros(count, np.int64)})
  options = tf.data.Options()
  if threads == 1:
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
  ds = (examples.map(preprocess, num_parallel_calls=threads).batch(BATCH).prefetch(2)
        .with_options(options))
  first = next(iter(ds))  # warm-up
  per_example = sum(v.numpy().nbytes for v in first.values()) // len(first['label'])
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in ds:
    pass
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return {'cpu_ms': 1000 * cpu / count, 'images_per_s': count / wall,
          'bytes_per_example': int(per_example),
          'image_dtype': first['image'].dtype.name}


def measure_all() -> list:
  cores = len(os.sched_getaffinity(0))
  data = images()
  results = []
  for label, name, kind, count, train in CASES:
    one = measure(name, data[kind], count, train, threads=1)
    every = measure(name, data[kind], count * cores, train, threads=cores)
    results.append({'case': label, 'one_thread': one, 'all_cores': every})
  return results


def result_of(command: list, what: str, env: dict = None):
  """The JSON of the last `RESULT ` line a measuring process prints; exits naming `what` if
  the process fails or prints none."""
  done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  lines = [line for line in done.stdout.splitlines() if line.startswith('RESULT ')]
  if done.returncode or not lines:
    sys.exit(f'{what} failed: {done.stderr.strip().splitlines()[-1:]}')
  return json.loads(lines[-1][len('RESULT '):])


def run_measurement(code_root: str) -> list:
  """measure_all() in a fresh process importing densenet_jax from code_root."""
  env = dict(os.environ, PYTHONPATH=code_root, TF_CPP_MIN_LOG_LEVEL='2')
  return result_of([sys.executable, os.path.abspath(__file__), '--measure'],
                   f'measuring {code_root}', env)


def extract(revision: str, into: str) -> str:
  """The densenet_jax package of a git revision, extracted under `into`."""
  archive = subprocess.run(['git', '-C', ROOT, 'archive', revision, 'densenet_jax'],
                           capture_output=True, check=False)
  if archive.returncode:
    sys.exit(f'--before {revision}: {archive.stderr.decode().strip()}')
  with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
    tar.extractall(into, filter='data')
  return into


def torchvision_rates(python: str, jpegs: list) -> dict:
  with tempfile.TemporaryDirectory() as folder:
    for i, data in enumerate(jpegs):
      with open(os.path.join(folder, f'{i}.jpg'), 'wb') as f:
        f.write(data)
    return result_of([python, os.path.join(ROOT, 'experiments', 'torchvision_pipeline.py'),
                      folder], f'torchvision ({python})')


def print_rows(side: str, results: list, cores: int):
  for r in results:
    one, every = r['one_thread'], r['all_cores']
    print(f'| {r["case"]} | {side} | {one["cpu_ms"]:.2f} | {every["cpu_ms"]:.2f} | '
          f'{every["images_per_s"]:,.0f} ({every["images_per_s"] / cores:,.0f}/core) | '
          f'{one.get("bytes_per_example", 0):,} {one.get("image_dtype", "")} |')


def print_buffers(data: dict):
  sys.path.insert(0, ROOT)
  from densenet_jax import datasets  # pylint: disable=import-outside-toplevel
  buffer = datasets.SPECS['imagenet2012'].shuffle_buffer
  jpeg, png = (np.mean([len(x) for x in data[k]]) for k in ('jpegs', 'cifar'))
  print(f'\nShuffle buffers hold encoded bytes, before and after (decoding follows the shuffle). '
        f'ImageNet: {buffer:,} examples per process x {IMAGENET_MEAN_JPEG_BYTES / 1e3:.0f} KB '
        f'(its mean JPEG) = {buffer * IMAGENET_MEAN_JPEG_BYTES / 2**20:,.0f} MiB (with these '
        f'{jpeg / 1e3:.0f} KB JPEGs: {buffer * jpeg / 2**20:,.0f} MiB). CIFAR: the whole share, '
        f'50,000 x {png / 1e3:.1f} KB (these PNG crops) = {50_000 * png / 2**20:,.0f} MiB.')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--before', help='git revision to compare with')
  parser.add_argument('--torchvision-python', help='python of a venv with torchvision')
  parser.add_argument('--measure', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.measure:
    print('RESULT ' + json.dumps(measure_all()), flush=True)
    return
  cores = len(os.sched_getaffinity(0))
  print(f'{cores} CPU cores, load average {os.getloadavg()[0]:.1f}\n')
  print('| case | code | CPU-ms/image, 1 thread | CPU-ms/image, all cores | images/s, all cores '
        '| host -> device bytes/example |')
  print('|---|---|---|---|---|---|')
  print_rows('this checkout', run_measurement(ROOT), cores)
  if args.before:
    with tempfile.TemporaryDirectory() as folder:
      print_rows(f'before ({args.before})', run_measurement(extract(args.before, folder)), cores)
  data = images()
  if args.torchvision_python:
    rates = torchvision_rates(args.torchvision_python, data['jpegs'])
    print_rows(f'torchvision {rates["version"]} v2 on PIL', rates['results'], cores)
  print_buffers(data)


if __name__ == '__main__':
  main()
