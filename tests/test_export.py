"""--mode=export: each file loads in a fresh process where densenet_jax cannot be imported and
scores real photos (scikit-learn's) as --mode=predict does; what cannot be exported is refused
before anything is written, and a failed export leaves nothing behind. (keras.weights.h5 of
published weights: test_finetune.py; the Keras and torchvision layouts: test_convert.py.)

The reference logits are predict's function (float32); the tolerance is ten times the float32
error of those logits, measured against the same model in float64.
"""

import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from configs import digits, finetune
from densenet_jax import export, inference, predict, run_setup
from densenet_jax.settings import ModelSettings, RunSettings
import helpers

CLASS_NAMES = [f'class {c}' for c in 'abcdef']
SIZE = 32
HAS_TORCH = importlib.util.find_spec('torch') is not None
HAS_TORCHVISION = importlib.util.find_spec('torchvision') is not None


def photo_config(data_dir):
  """A tiny ImageNet-stem DenseNet-BC (torchvision's layout) on a folder of photos, 32x32."""
  config = finetune.get_config()
  config.dataset = f'folder:{data_dir}'
  config.init_from = ''
  config.image_size = SIZE
  config.model.block_sizes, config.model.growth_rate = (1, 2), 4
  return config


@pytest.fixture(scope='module')
def photo_run(tmp_path_factory):
  """(config, workdir, photo files, unreadable file): scikit-learn's two photos, as JPEG and
  PNG, whole and cropped (six files), and a file that is no image."""
  root = tmp_path_factory.mktemp('export')
  config = photo_config(root / 'data')
  model = run_setup.build_model(ModelSettings.from_config(config), len(CLASS_NAMES))
  workdir = root / 'run'
  helpers.write_random_run(workdir, model, (SIZE, SIZE, 3), 11, {
      'dataset': config.dataset, 'class_names': CLASS_NAMES, 'image_shape': [SIZE, SIZE, 3],
      'normalization': [255.0, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]],
      'folder_transform': {'size': SIZE, 'transform': 'resize_center_crop',
                           'crop_ratio': 0.875}}, np.random.default_rng(0))
  files = []
  for i, photo in enumerate(load_sample_images().images):
    for j, (image, ext) in enumerate([(photo, 'jpg'), (photo[50:300, 100:500], 'png'),
                                      (photo[::-1, ::2], 'jpg')]):
      files.append(str(root / 'photos' / f'{i}{j}.{ext}'))
      os.makedirs(os.path.dirname(files[-1]), exist_ok=True)
      Image.fromarray(np.ascontiguousarray(image)).save(files[-1])
  broken = root / 'photos' / 'broken.jpg'
  broken.write_bytes(b'not a jpeg')
  return config, str(workdir), files, str(broken)


FRESH_PROCESS = r'''
import json, os, sys
sys.modules['densenet_jax'] = None  # whatever is installed: this process cannot import it
try:
  import densenet_jax
  raise SystemExit('densenet_jax imported')
except ImportError:
  pass
import numpy as np
export_dir, images_npy, files, out = sys.argv[1], sys.argv[2], sys.argv[3].split(','), sys.argv[4]
images = np.load(images_npy)
meta = json.load(open(os.path.join(export_dir, 'classes.json')))
results = {}

import jax
exported = jax.export.deserialize(open(os.path.join(export_dir, 'model.jax'), 'rb').read())
results['jax'] = np.asarray(exported.call(images))
results['jax_batch1'] = np.asarray(exported.call(images[:1]))

if 'saved_model' in meta['files']:
  import tensorflow as tf
  saved = tf.saved_model.load(os.path.join(export_dir, 'saved_model'))
  results['saved_model'] = saved.signatures['serving_default'](
      images=tf.constant(images))['logits'].numpy()
  encoded = [open(f, 'rb').read() for f in files]
  results['saved_model_encoded'] = saved.signatures['serve_encoded'](
      encoded=tf.constant(encoded))['logits'].numpy()

if os.path.exists(os.path.join(export_dir, 'torchvision.pth')) and '--torchvision' in sys.argv:
  sys.modules.setdefault('triton', None)  # torchvision's triton import crashes beside TF
  import torch, torchvision
  model = eval(meta['files']['torchvision.pth'].split('.load_state_dict')[0])
  model.load_state_dict(torch.load(os.path.join(export_dir, 'torchvision.pth')), strict=True)
  scale, mean, std = (meta['eval_transform']['normalization'][k] for k in ('scale', 'mean', 'std'))
  x = (images / scale - np.array(mean)) / np.array(std)
  with torch.no_grad():
    results['torchvision'] = model.eval()(
        torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))).numpy()
np.savez(out, **results, class_names=np.array(meta['class_names']))
'''


def _reference(config, workdir, files):
  """(uint8 eval images as predict makes them, predict's logits, float32 noise floor)."""
  settings = RunSettings.from_config(config)
  data, state = predict.inference_model(settings, workdir)
  kept, images, unreadable = predict._load(files, data.eval_preprocessor())  # pylint: disable=protected-access
  assert kept == files and not unreadable
  images = np.stack(images)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits = np.asarray(jax.jit(predict.on_uint8_images(data, state))(variables, images))
  with jax.enable_x64(True):
    model64 = run_setup.build_model(ModelSettings.from_config(config), len(CLASS_NAMES))
    model64 = model64.clone(dtype='float64')
    state64 = inference.InferenceState(
        step=0, apply_fn=model64.apply,
        **jax.tree.map(lambda x: np.asarray(x, np.float64), variables))
    logits64 = np.asarray(jax.jit(predict.on_uint8_images(data, state64))(
        jax.tree.map(np.asarray, {'params': state64.params, 'batch_stats': state64.batch_stats}),
        images))
  noise = np.abs(logits - logits64).max()
  assert 0 < noise < 1e-3 * np.abs(logits64).max()
  return images, logits, logits64, noise


@pytest.mark.slow
def test_exports_score_photos_as_predict_in_a_process_without_densenet_jax(photo_run, tmp_path):
  config, workdir, files, broken = photo_run
  export_dir = tmp_path / 'export'
  written = export.export(RunSettings.from_config(config), workdir, str(export_dir))
  meta = json.loads((export_dir / 'classes.json').read_text())
  assert meta['not_written'] == {}
  expected = {'model.jax', 'saved_model', 'classes.json'} | (
      {'torchvision.pth'} if HAS_TORCH else set())
  assert {os.path.basename(p) for p in written} == expected == set(os.listdir(export_dir))
  assert set(meta['files']) == expected - {'classes.json'}
  assert not [n for n in os.listdir(tmp_path) if n.endswith('.partial')]
  assert meta['class_names'] == CLASS_NAMES
  assert meta['input']['shape'] == ['batch', SIZE, SIZE, 3]
  assert meta['source'] == {'workdir': workdir, 'init_from': None, 'step': 11,
                            'dataset': config.dataset}
  assert meta['eval_transform']['folder'] == {'size': SIZE, 'transform': 'resize_center_crop',
                                              'crop_ratio': 0.875}

  images, logits, logits64, noise = _reference(config, workdir, files)
  predictions = predict.predict(config, workdir, files + [broken], top_k=5)
  assert predictions.files == files and [f for f, _ in predictions.unreadable] == [broken]
  np.testing.assert_array_equal(np.argsort(-logits, 1, kind='stable')[:, :5],
                                predictions.top_classes)

  np.save(tmp_path / 'images.npy', images)
  helpers.run_fresh(FRESH_PROCESS, export_dir, tmp_path / 'images.npy', ','.join(files),
            tmp_path / 'out.npz', *(['--torchvision'] if HAS_TORCHVISION else []))
  with np.load(tmp_path / 'out.npz') as out:
    results = {k: out[k] for k in out.files}
  assert list(results.pop('class_names')) == CLASS_NAMES
  for fmt, got in results.items():  # jax_batch1: the first image alone (the batch is symbolic)
    error = np.abs(got - logits64[:len(got)]).max()
    print(f'{fmt}: max |logits - float64| {error:.3g} (predict, float32: {noise:.3g})')
    assert error <= 10 * noise, fmt
    np.testing.assert_array_equal(np.argsort(-got, 1, kind='stable')[:, :5],
                                  predictions.top_classes[:len(got)], err_msg=fmt)
  assert ('torchvision' in results) == HAS_TORCHVISION
  assert 'saved_model_encoded' in results


def test_bad_exports_fail_before_writing_and_leave_nothing(photo_run, tmp_path, monkeypatch):
  config, workdir, _, _ = photo_run
  settings = RunSettings.from_config(config)
  taken = tmp_path / 'taken'
  taken.mkdir()
  (taken / 'keep.txt').write_text('old')

  def fails(match, *args, **kwargs):
    with pytest.raises(export.ExportError, match=match):
      export.export(*args, **kwargs)

  fails(r'--export_dir=.*taken exists; .*--overwrite', settings, workdir, str(taken))
  fails(r"'onnx' is unknown; allowed: jax, saved_model, torchvision, keras", settings, workdir,
        str(tmp_path / 'a'), ['onnx'])
  fails(r'no keras export for this model: keras.applications has densenet121, densenet169, '
        r'densenet201; this model is densenet_bc', settings, workdir, str(tmp_path / 'b'),
        ['jax', 'keras'])
  cifar = RunSettings.from_config(digits.get_config())
  fails(r'no torchvision export .* ImageNet stem.* \(cifar stem\)', cifar, workdir,
        str(tmp_path / 'c'), ['torchvision'])
  started = tmp_path / 'started'  # a run stopped before its first checkpoint
  started.mkdir()
  (started / run_setup.CLASSES_FILE).write_bytes(
      open(os.path.join(workdir, run_setup.CLASSES_FILE), 'rb').read())
  with pytest.raises(run_setup.RunError, match='no checkpoint'):
    export.export(settings, str(started), str(tmp_path / 'd'), ['jax'])
  shutil.rmtree(started)

  def broken_saved_model(path, *args):
    os.makedirs(path)
    open(os.path.join(path, 'half'), 'w').close()
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(export, 'write_saved_model', broken_saved_model)
  with pytest.raises(OSError, match='No space left'):
    export.export(settings, workdir, str(taken), ['jax', 'saved_model'], overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ['taken']  # no partial export, the old one as it was
  assert os.listdir(taken) == ['keep.txt']
  monkeypatch.undo()
  export.export(settings, workdir, str(taken), ['jax'], overwrite=True)
  assert sorted(os.listdir(taken)) == ['classes.json', 'model.jax']
  assert sorted(os.listdir(tmp_path)) == ['taken']

  # A TensorFlow that cannot run the SavedModel (a JAX newer than export knows): a default
  # export leaves it out and says why, an explicit one fails.
  def unreadable(*_):
    raise export.SavedModelUnsupported('TensorFlow X cannot run the SavedModel that jax Y ...')

  monkeypatch.setattr(export, 'check_saved_model', unreadable)
  monkeypatch.setattr(export, 'FORMATS', ('jax', 'saved_model'))
  export.export(settings, workdir, str(tmp_path / 'default'))
  meta = json.loads((tmp_path / 'default' / 'classes.json').read_text())
  assert sorted(os.listdir(tmp_path / 'default')) == ['classes.json', 'model.jax']
  assert list(meta['files']) == ['model.jax']
  assert meta['not_written'] == {'saved_model': 'TensorFlow X cannot run the SavedModel that '
                                                'jax Y ...'}
  with pytest.raises(export.SavedModelUnsupported):
    export.export(settings, workdir, str(tmp_path / 'explicit'), ['saved_model'])
  assert sorted(os.listdir(tmp_path)) == ['default', 'taken']
