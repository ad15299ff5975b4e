"""Latency and size of --mode=export's artifacts against predict's own function, on this machine.

  python experiments/export_benchmark.py [--model densenet121] [--repeats 5]

An ImageNet model with random weights (no dataset or download needed: ImageNet's class names
ship with the package) is exported as model.jax and saved_model/ (densenet_jax/export.py) into
a temporary folder. Then, per batch size (1 and 32) of uint8 224x224 images, the median
wall-clock time of a call, after one warm-up call (which compiles):
  predict     the jitted uint8-to-logits function that --mode=predict calls per batch
              (predict.batch_size: up to 32 images a call; a single image is a batch of 1)
  jax.export  jax.export.deserialize(model.jax).call(images)
  SavedModel  tf.saved_model.load(saved_model).signatures['serving_default'](images=...)
plus each artifact's size, the largest logit difference from predict (relative to the largest
logit), and what the TFLite converter says of the SavedModel (its own messages go to stderr).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from configs import common  # pylint: disable=wrong-import-position
from densenet_jax import export, inference, models, predict  # pylint: disable=wrong-import-position
from densenet_jax import runtime  # pylint: disable=wrong-import-position
from densenet_jax.settings import RunSettings  # pylint: disable=wrong-import-position


def timed(fn, images, repeats: int) -> tuple:
  """(median seconds per call after a warm-up call, the warm-up's output)."""
  out = np.asarray(fn(images))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    np.asarray(fn(images))
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='densenet121')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  runtime.keep_tensorflow_off_accelerators()
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  config = common.imagenet_config(args.model)
  settings = RunSettings.from_config(config)
  data = predict._data(settings, None)  # pylint: disable=protected-access
  model = models.build_model(**dict(settings.model.fields), num_classes=data.info.num_classes)
  variables, _ = inference.init_variables(model, jax.random.key(0), data.info.image_shape)
  state = inference.InferenceState(step=0, apply_fn=model.apply, **variables)
  shape = export.input_shape(data)
  print(f'{args.model}, {jax.devices()[0].platform} ({os.cpu_count()} cores), jax '
        f'{jax.__version__}, TensorFlow {tf.__version__}; uint8 {shape} images; median of '
        f'{args.repeats} calls after a warm-up call\n')

  with tempfile.TemporaryDirectory() as directory:
    jax_path = os.path.join(directory, 'model.jax')
    saved_path = os.path.join(directory, 'saved_model')
    start = time.perf_counter()
    with open(jax_path, 'wb') as f:
      f.write(export.jax_export(export.logits_function(data, state), shape))
    jax_seconds = time.perf_counter() - start
    start = time.perf_counter()
    export.write_saved_model(saved_path, data, state, shape)
    saved_seconds = time.perf_counter() - start

    on_uint8 = jax.jit(predict.on_uint8_images(data, state))
    runners = {
        'predict': lambda x: on_uint8(variables, x),
        'jax.export': jax.export.deserialize(open(jax_path, 'rb').read()).call,
        'SavedModel': lambda x, s=tf.saved_model.load(saved_path).signatures['serving_default']:
            s(images=tf.constant(x))['logits'].numpy(),
    }
    print('| batch | ' + ' | '.join(f'{name} ms' for name in runners)
          + ' | max logit difference from predict / max logit |')
    print('|---|' + '---|' * (len(runners) + 1))
    rng = np.random.default_rng(0)
    for batch in (1, 32):
      images = rng.integers(0, 256, (batch, *shape), dtype=np.uint8)
      results = {name: timed(fn, images, args.repeats) for name, fn in runners.items()}
      reference = results['predict'][1]
      difference = max(np.abs(out - reference).max() for _, out in results.values())
      print(f'| {batch} | ' + ' | '.join(f'{t * 1e3:.0f}' for t, _ in results.values())
            + f' | {difference / np.abs(reference).max():.2g} |')

    print(f'\nmodel.jax: {size(jax_path) / 1e6:.1f} MB (written in {jax_seconds:.1f} s); '
          f'saved_model/: {size(saved_path) / 1e6:.1f} MB (written in {saved_seconds:.1f} s); '
          f'parameters + BN statistics: '
          f'{sum(x.size * 4 for x in jax.tree.leaves(variables)) / 1e6:.1f} MB as float32')
    tflite_report(tf, saved_path, images[:1], results['predict'][1][:1])


def tflite_report(tf, saved_path: str, image: np.ndarray, logits: np.ndarray):
  """What the TFLite converter says of the SavedModel: both signatures with TFLite's builtin ops,
  with TF Select ops, and serving_default alone; a model it converts scores one image."""
  attempts = (('both signatures, builtin ops', None, False),
              ('both signatures, builtin + TF Select ops', None, True),
              ('serving_default alone, builtin ops', ['serving_default'], False))
  for label, keys, select in attempts:
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_path, signature_keys=keys)
    if select:
      converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                             tf.lite.OpsSet.SELECT_TF_OPS]
    try:
      flatbuffer = converter.convert()
    except Exception as e:  # pylint: disable=broad-except  (report whatever it says)
      messages = [line.strip() for line in str(e).splitlines() if 'error' in line.lower()]
      print(f'TFLite, {label}: {type(e).__name__}: ' + ' / '.join(messages[:2])[:500])
      continue
    interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    try:
      runner = interpreter.get_signature_runner('serving_default')
      got = runner(images=image)['logits']
      print(f'TFLite, {label}: converted ({len(flatbuffer) / 1e6:.1f} MB); one image: max logit '
            f'difference from predict / max logit {np.abs(got - logits).max() / np.abs(logits).max():.2g}')
    except Exception as e:  # pylint: disable=broad-except
      print(f'TFLite, {label}: converted ({len(flatbuffer) / 1e6:.1f} MB), but running it: '
            f'{type(e).__name__}: {str(e).splitlines()[0][:300]}')

if __name__ == '__main__':
  main()
