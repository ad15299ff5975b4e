"""--mode=export: a model (a run's best checkpoint, or init_from's weights) as files that run
without this project.

  DIR/model.jax           jax.export of uint8 images [B, H, W, C] (any B) -> float32 logits
                          [B, classes], with the eval normalization inside and the weights
                          embedded; serialized for cpu, cuda and tpu.
  DIR/saved_model/        the same function as a TF SavedModel (jax2tf, native serialization):
                          signature 'serving_default' over uint8 images, 'serve_encoded' over
                          encoded image files (the model's eval decode, resize and crop first).
  DIR/torchvision.pth     a state_dict for torchvision.models.DenseNet (ImageNet stem).
  DIR/keras.weights.h5    weights for keras.applications.DenseNet121/169/201.
  DIR/classes.json        class names, input, eval transform, source, versions, loaders.

The export is written into a temporary directory next to DIR and renamed to DIR when complete:
a failed export leaves nothing, and --overwrite replaces an old one only then. The
uint8-to-logits function is predict's (`predict.on_uint8_images`), so an export scores an image
as --mode=predict does.
"""

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import tempfile
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from densenet_jax import architectures, convert, errors, models, predict, run_setup, weights
from densenet_jax.settings import RunSettings

FORMATS = ('jax', 'saved_model', 'torchvision', 'keras')
FILES = {'jax': 'model.jax', 'saved_model': 'saved_model', 'torchvision': 'torchvision.pth',
         'keras': 'keras.weights.h5'}
METADATA_FILE = 'classes.json'
PLATFORMS = ('cpu', 'cuda', 'tpu')
# The named networks torchvision builds by name (those it publishes weights of).
TORCHVISION_MODELS = tuple(entry.model for key, entry in weights.PUBLISHED.items()
                           if key.startswith('torchvision:'))
KERAS_MODELS = convert.KERAS_APPLICATIONS


class ExportError(errors.UserError, ValueError):
  """An export that cannot be made as asked; nothing was written."""


def _name(model: models.DenseNet) -> str:
  return architectures.Architecture(tuple(model.block_sizes), model.growth_rate,
                                    model.bottleneck, model.compression, model.stem).name


def unavailable(fmt: str, model: models.DenseNet) -> Optional[str]:
  """Why the network cannot be exported in format `fmt`, or None if it can."""
  name = _name(model)
  if fmt == 'torchvision' and not convert.torchvision_compatible(model):
    return ('torchvision.models.DenseNet has an ImageNet stem, a 4k bottleneck and '
            f'compression 0.5; this model is {name} ({model.stem} stem)')
  if fmt == 'keras' and (name not in KERAS_MODELS
                         or model.num_stem_features != 2 * model.growth_rate):
    return (f'keras.applications has {", ".join(KERAS_MODELS)}; this model is {name}'
            + ('' if name not in KERAS_MODELS else
               f' with a {model.num_stem_features}-channel stem'))
  return None


def formats_for(requested: Optional[Sequence[str]], model: models.DenseNet) -> tuple:
  """The formats to write: `requested` (each must be possible), or by default all the
  network can have (torchvision only where torch is installed). Raises ExportError naming the
  first that is unknown or impossible."""
  if not requested:
    return tuple(f for f in FORMATS if unavailable(f, model) is None
                 and (f != 'torchvision' or importlib.util.find_spec('torch') is not None))
  for fmt in requested:
    if fmt not in FORMATS:
      raise ExportError(f'--export_formats: {fmt!r} is unknown; allowed: {", ".join(FORMATS)}')
    reason = unavailable(fmt, model)
    if reason:
      raise ExportError(f'--export_formats: no {fmt} export for this model: {reason}')
  return tuple(dict.fromkeys(requested))


def check_destination(export_dir: str, overwrite: bool):
  if os.path.exists(export_dir) and not overwrite:
    raise ExportError(f'--export_dir={export_dir} exists; choose another or pass --overwrite '
                      '(the old export is replaced once the new one is complete)')
  parent = os.path.dirname(os.path.abspath(export_dir))
  if not os.access(parent, os.W_OK):
    raise ExportError(f'--export_dir={export_dir}: cannot write in {parent}')


def _logits(data, state):
  """fn(variables, uint8 images [B, H, W, C]) -> float32 logits: predict's function."""
  on_uint8 = predict.on_uint8_images(data, state)
  return lambda variables, images: on_uint8(variables, images).astype(jnp.float32)


def logits_function(data, state):
  """fn(uint8 images [B, H, W, C]) -> float32 logits, the weights closed over (embedded)."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits = _logits(data, state)
  return lambda images: logits(variables, images)


def input_shape(data) -> tuple:
  """(H, W, C) of the uint8 images the eval preprocessor makes (before the device's resize)."""
  return tuple(data.spec.image_shape or data.info.image_shape)


def jax_export(fn, shape: tuple) -> bytes:
  """`fn` serialized with jax.export for PLATFORMS, over a symbolic batch size."""
  batch, = jax.export.symbolic_shape('b')
  exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(
      jax.ShapeDtypeStruct((batch, *shape), jnp.uint8))
  return exported.serialize()


def _tensorflow_stablehlo_version() -> Optional[str]:
  """The newest StableHLO version this TensorFlow reads, or None where it does not say."""
  try:
    from tensorflow.compiler.mlir.stablehlo import stablehlo  # pylint: disable=import-outside-toplevel
    return stablehlo.get_current_version()
  except (ImportError, AttributeError):
    return None


@contextlib.contextmanager
def stablehlo_readable_by_tensorflow():
  """While active, jax.export (which jax2tf calls) writes StableHLO that this TensorFlow reads.

  jax.export serializes for the StableHLO version of about four weeks before the JAX release;
  a TensorFlow built before that cannot read it (TensorFlow 2.21 reads StableHLO 1.13.7; jax
  0.11.2 and 0.12 write newer, e.g. the custom call of their batch-size check). JAX has no public
  setting for the version, so the function its serializer asks for it is replaced here by one
  that answers no newer than TensorFlow's. Where JAX's internals differ, nothing is replaced,
  and check_saved_model says what TensorFlow makes of the result.
  """
  try:
    from jax._src.export import _export  # pylint: disable=import-outside-toplevel
    hlo = _export.hlo
    original = hlo.get_version_from_compatibility_requirement
  except (ImportError, AttributeError):
    original = None
  tensorflow_version = _tensorflow_stablehlo_version()
  if original is None or tensorflow_version is None:
    yield
    return
  hlo.get_version_from_compatibility_requirement = (
      lambda requirement: hlo.get_smaller_version(original(requirement), tensorflow_version))
  try:
    yield
  finally:
    hlo.get_version_from_compatibility_requirement = original


def write_saved_model(path: str, data, state, shape: tuple):
  """A TF SavedModel: the weights as tf.Variables, the model through jax2tf (native
  serialization, PLATFORMS, StableHLO that this TensorFlow reads), signatures over uint8 images
  and over encoded files."""
  with stablehlo_readable_by_tensorflow():
    _save_saved_model(path, data, state, shape)
  check_saved_model(path, shape)


def _save_saved_model(path: str, data, state, shape: tuple):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from jax.experimental import jax2tf  # pylint: disable=import-outside-toplevel
  converted = jax2tf.convert(
      _logits(data, state),
      polymorphic_shapes=[None, '(b, ' + ', '.join(map(str, shape)) + ')'],
      native_serialization_platforms=PLATFORMS, with_gradient=False)
  module = tf.Module()
  module.variables_ = tf.nest.map_structure(
      tf.Variable, {'params': state.params, 'batch_stats': state.batch_stats})
  preprocess = data.eval_preprocessor()

  @tf.function(input_signature=[tf.TensorSpec([None, *shape], tf.uint8, name='images')],
               autograph=False)
  def serve_images(images):
    return {'logits': converted(module.variables_, images)}

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='encoded')])
  def serve_encoded(encoded):
    images = tf.map_fn(preprocess, encoded,
                       fn_output_signature=tf.TensorSpec(shape, tf.uint8))
    return serve_images(images)

  module.serve_images, module.serve_encoded = serve_images, serve_encoded
  tf.saved_model.save(module, path, signatures={'serving_default': serve_images,
                                                'serve_encoded': serve_encoded})


class SavedModelUnsupported(ExportError):
  """This TensorFlow cannot run the StableHLO that this JAX serializes."""


def check_saved_model(path: str, shape: tuple):
  """Loads the SavedModel and scores one blank image on the CPU, as a user would: raises
  SavedModelUnsupported where TensorFlow cannot deserialize what JAX wrote (a JAX newer than
  stablehlo_readable_by_tensorflow knows)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  signature = tf.saved_model.load(path).signatures['serving_default']
  try:
    with tf.device('/CPU:0'):
      signature(images=tf.zeros((1, *shape), tf.uint8))
  except tf.errors.InvalidArgumentError as e:
    if 'deserialize' not in str(e):
      raise
    raise SavedModelUnsupported(
        f'TensorFlow {tf.__version__} cannot run the SavedModel that jax {jax.__version__} '
        'serializes (its StableHLO is newer than this TensorFlow reads); install a TensorFlow '
        'released after this JAX, or an older JAX, or leave saved_model out with '
        '--export_formats') from None


def write_torchvision(path: str, variables: dict):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ExportError('the torchvision export needs torch (not torchvision): pip install torch; '
                      'or leave it out with --export_formats') from e
  torch.save({k: torch.from_numpy(v) for k, v in convert.to_torchvision(variables).items()},
             path)


def write_keras(path: str, variables: dict, name: str):
  import keras  # pylint: disable=import-outside-toplevel
  num_classes = variables['params']['classifier']['bias'].shape[0]
  model = getattr(keras.applications, KERAS_MODELS[name])(weights=None, classes=num_classes)
  convert.to_keras(variables, model)
  model.save_weights(path)


def loaders(formats: Sequence[str], model: models.DenseNet) -> dict:
  """How to load each file (what the README shows), recorded in classes.json."""
  code = {
      'jax': "jax.export.deserialize(open('model.jax', 'rb').read()).call(uint8_images)",
      'saved_model': "tf.saved_model.load('saved_model').signatures['serving_default']"
                     "(images=uint8_images)['logits']",
  }
  name, num_classes = _name(model), model.num_classes
  if 'torchvision' in formats:
    if name in TORCHVISION_MODELS and model.num_stem_features == 2 * model.growth_rate:
      build = f'torchvision.models.{name}(num_classes={num_classes})'
    else:
      build = (f'torchvision.models.DenseNet(growth_rate={model.growth_rate}, block_config='
               f'{tuple(model.block_sizes)}, num_init_features={model.num_stem_features}, '
               f'num_classes={num_classes})')
    code['torchvision'] = (f"{build}.load_state_dict(torch.load('torchvision.pth'), "
                           'strict=True)')
  if 'keras' in formats:
    code['keras'] = (f'keras.applications.{KERAS_MODELS[name]}(weights=None, '
                     f"classes={num_classes}).load_weights('keras.weights.h5')")
  return {FILES[f]: code[f] for f in formats}


def _versions() -> dict:
  versions = {'python': platform.python_version()}
  for package in ('jax', 'jaxlib', 'flax', 'tensorflow', 'tensorflow-cpu', 'torch', 'keras'):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def metadata(data, state, settings: RunSettings, workdir: Optional[str], formats,
             model: models.DenseNet, skipped: dict) -> dict:
  info, view, shape = data.info, data.view, input_shape(data)
  scale, mean, std = info.normalization
  return {
      'class_names': list(info.class_names),
      'input': {'shape': ['batch', *shape], 'dtype': 'uint8', 'layout': 'NHWC',
                'model_input_shape': list(info.image_shape)},
      'eval_transform': {
          'host': data.spec.host_eval, 'size': view.size, 'eval_resize': view.eval_resize,
          **({'folder': view.folder_transform} if view.folder is not None else {}),
          'normalization': {'scale': scale, 'mean': list(mean), 'std': list(std),
                            'formula': '(pixels / scale - mean) / std, inside the model.jax '
                                       'and SavedModel functions only'}},
      'model': {'architecture': _name(model), **dict(settings.model.fields)},
      'source': {'workdir': workdir, 'init_from': settings.init_from or None,
                 'step': int(np.asarray(state.step)), 'dataset': info.name},
      'outputs': 'logits (float32, before softmax)',
      'jax_export_platforms': list(PLATFORMS),
      'files': loaders(formats, model),
      'not_written': skipped,  # {format: why}, of the formats a default export leaves out
      'versions': _versions(),
  }


def export(settings: RunSettings, workdir: Optional[str], export_dir: str,
           requested_formats: Optional[Sequence[str]] = None, overwrite: bool = False) -> list:
  """Writes the export; returns the paths written. Everything a user can get wrong (formats,
  destination, weights) fails before anything is written."""
  formats = formats_for(requested_formats, run_setup.build_model(settings.model, 1))
  check_destination(export_dir, overwrite)
  data, state = predict.inference_model(settings, workdir)
  model = run_setup.build_model(settings.model, data.info.num_classes)
  export_dir = os.path.abspath(export_dir)
  staging = _staging_dir(export_dir)
  try:
    formats, skipped = _write_formats(staging, formats, not requested_formats, data, state,
                                      model)
    with open(os.path.join(staging, METADATA_FILE), 'w') as f:
      json.dump(metadata(data, state, settings, workdir, formats, model, skipped), f, indent=1)
    _replace(staging, export_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return [os.path.join(export_dir, FILES[f]) for f in formats] + [
      os.path.join(export_dir, METADATA_FILE)]


def _write_formats(directory: str, formats: tuple, by_default: bool, data, state,
                   model: models.DenseNet) -> tuple:
  """Writes each format's file into `directory`: (the formats written, {left out: why}). A
  default export leaves out a SavedModel that this TensorFlow cannot run; a requested one
  fails."""
  variables = jax.tree.map(np.asarray, {'params': state.params, 'batch_stats': state.batch_stats})
  shape, skipped = input_shape(data), {}

  def path(fmt):
    return os.path.join(directory, FILES[fmt])

  if 'jax' in formats:
    with open(path('jax'), 'wb') as f:
      f.write(jax_export(logits_function(data, state), shape))
  if 'saved_model' in formats:
    try:
      write_saved_model(path('saved_model'), data, state, shape)
    except SavedModelUnsupported as e:
      if not by_default:
        raise
      logging.warning('No SavedModel: %s', e)
      shutil.rmtree(path('saved_model'))
      skipped['saved_model'] = str(e)
  if 'torchvision' in formats:
    write_torchvision(path('torchvision'), variables)
  if 'keras' in formats:
    write_keras(path('keras'), variables, _name(model))
  return tuple(f for f in formats if f not in skipped), skipped


def _staging_dir(export_dir: str) -> str:
  """A new directory next to export_dir (same file system: renamed into place when complete),
  with the permissions os.mkdir would give it (mkdtemp's are 0700)."""
  staging = tempfile.mkdtemp(dir=os.path.dirname(export_dir),
                             prefix=f'.{os.path.basename(export_dir)}.', suffix='.partial')
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(staging, 0o777 & ~umask)
  return staging


def _replace(staging: str, export_dir: str):
  """Renames the complete `staging` to `export_dir`; an old export there goes only after."""
  old = None
  if os.path.exists(export_dir):
    old = staging[:-len('.partial')] + '.old'
    os.replace(export_dir, old)
  os.replace(staging, export_dir)
  if old and os.path.isdir(old):
    shutil.rmtree(old)
  elif old:
    os.remove(old)
