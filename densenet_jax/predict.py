"""--mode=predict: the top-k classes of image files, with names and probabilities; --mode=embed:
their pooled features (the headless model's output), for linear probes and retrieval.

The model is a run's best (or latest) checkpoint (--workdir) or config.init_from's weights; each
image gets the eval transform the model was trained with (the dataset's, as the eval step sees
it; a folder run's as recorded in its workdir, so the data may have moved since; published
weights' own eval resize). Class names: the run's classes.json, else those that ship with the
package (data/imagenet_classes.tsv for ImageNet models), else the dataset's.

Neither the optimizer (optax) nor the training loop is imported: see tests/test_predict.py.
"""

import csv
import dataclasses
import os
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tqdm

from densenet_jax import config_validation, datasets, folder_listing, inference, input_pipeline
from densenet_jax import errors, run_setup, weight_sources, weights
from densenet_jax import preprocessing as pp
from densenet_jax.settings import RunSettings

DATA = os.path.join(os.path.dirname(__file__), 'data')  # class names that ship with the package
BATCH = 32  # images per forward pass at most (the last one padded: one compile)


class MissingImages(errors.UserError, FileNotFoundError):
  """An --images path that does not exist."""


def shipped_classes(spec: datasets.DatasetSpec) -> list:
  """[(class id, names)] in label order, of a dataset whose class names ship with the package
  (ImageNet's 1,000: WordNet ids and names)."""
  with open(os.path.join(DATA, spec.class_names_file)) as f:
    return [tuple(line.rstrip('\n').split('\t')) for line in f if not line.startswith('#')]


def image_files(paths: Sequence[str]) -> list:
  """Each path itself if it is a file, else the image files under it (sorted)."""
  files = []
  for path in paths:
    if os.path.isdir(path):
      for parent, dirs, names in os.walk(path):
        dirs.sort()
        files += [os.path.join(parent, n) for n in sorted(names)
                  if n.lower().endswith(folder_listing.IMAGE_EXTENSIONS)]
    elif os.path.exists(path):
      files.append(path)
    else:
      raise MissingImages(f'--images: {path}: no such file or directory')
  return files


@dataclasses.dataclass
class Predictions:
  files: list  # the files that decoded
  top_classes: np.ndarray  # int [files, k], best first
  top_probabilities: np.ndarray  # float [files, k]
  class_names: list
  unreadable: list  # (file, reason)

  def table(self) -> str:
    rows = []
    for f, classes, probs in zip(self.files, self.top_classes, self.top_probabilities):
      cells = [f'{self.class_names[c]} {p:.3f}' for c, p in zip(classes, probs)]
      rows.append(f'{f} | ' + ' | '.join(cells))
    rows += [f'unreadable: {f} ({reason})' for f, reason in self.unreadable]
    return '\n'.join(rows)

  def write_csv(self, path: str):
    k = self.top_classes.shape[1]
    with open(path, 'w', newline='') as f:
      writer = csv.writer(f)
      writer.writerow(['file'] + [f'{field}_{i + 1}' for i in range(k)
                                  for field in ('class', 'probability')])
      for name, classes, probs in zip(self.files, self.top_classes, self.top_probabilities):
        writer.writerow([name] + [v for c, p in zip(classes, probs)
                                  for v in (self.class_names[c], f'{p:.6f}')])


def _data(settings: RunSettings, workdir: Optional[str]) -> input_pipeline.Data:
  """The data as the model saw it: its classes, input shape, normalization and eval transform.
  From the run's classes.json (the data may have moved since), else the class names that ship
  with the package (ImageNet's: no prepared ImageNet needed), else the dataset's own."""
  options = settings.data
  record = run_setup.read_classes(workdir) if workdir else None
  spec = datasets.spec(options.dataset, options.folder)
  if record is None and spec.class_names_file is None:
    return run_setup.open_data(options)
  if record is None:
    names = [n for _, n in shipped_classes(spec)]
    shape, normalization = datasets.image_shape(spec), spec.normalization
  else:
    names, shape = record['class_names'], tuple(record['image_shape'])
    normalization = tuple(record['normalization'])
  folder_transform = (record or {}).get('folder_transform')
  if folder_transform is not None:  # the run's own eval transform, not today's config.folder
    options = dataclasses.replace(options, image_size=folder_transform['size'], folder=(
        dataclasses.replace(options.folder, eval_transform=folder_transform['transform'],
                            center_crop_ratio=folder_transform['crop_ratio'])))
  info = datasets.DatasetInfo(options.dataset, len(names), shape, 0, {}, (), tuple(names),
                              tuple(normalization))
  return input_pipeline.Data(options, info=info)


def _load(files: list, transform) -> tuple:
  """(kept files, their eval images [n, H, W, C], [(unreadable file, reason)])."""
  kept, images, unreadable = [], [], []
  for name in files:
    try:
      with open(name, 'rb') as f:
        images.append(transform(tf.constant(f.read())).numpy())
      kept.append(name)
    except OSError as e:
      unreadable.append((name, e.strerror or str(e)))
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
      unreadable.append((name, pp.decode_error(e)))
  return kept, images, unreadable


def inference_model(settings: RunSettings, workdir: Optional[str]) -> tuple:
  """(data, state): the data as the model saw it (`_data`) and the model with its weights (the
  run's best or latest checkpoint, else settings.init_from's), as predict, embed and export use
  them. Published weights are downloaded first: a failed download fails before anything else."""
  weight_sources.fetch(settings.init_from)
  data = _data(settings, workdir)
  return data, run_setup.inference_state(settings, workdir, data.info)


def on_uint8_images(data: input_pipeline.Data, state: inference.InferenceState):
  """fn(variables, images) -> the model's outputs, for uint8 images [B, H, W, C] as the eval
  preprocessor makes them: the eval step's device transform (scale, normalization, resize)
  then the model."""
  device_transform = data.device_transform(train=False)
  return lambda variables, images: state.apply_fn(
      variables, inference.model_input(device_transform, {'image': images}), train=False)


def batch_size(num_files: int) -> int:
  """Images per forward pass for `num_files` files: BATCH, or for fewer files the smallest power
  of two that holds them all. One shape, so one compile, either way; a few photos are not padded
  to BATCH (DenseNet-121 on 2 images: one forward pass of 2, not of 32)."""
  return min(BATCH, 1 << max(num_files - 1, 0).bit_length())


def _outputs(files: Sequence[str], data, state, desc: str, unreadable: list):
  """Yields (files, model outputs [n, ...]) of each batch of `files`, of those that decoded;
  appends (file, reason) of the others to `unreadable`. Host memory stays that of one batch
  however many files there are."""
  transform = data.eval_preprocessor()
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  outputs_fn = jax.jit(on_uint8_images(data, state))
  size = batch_size(len(files))
  for start in tqdm.trange(0, len(files), size, desc=desc, disable=len(files) <= size):
    names, images, bad = _load(files[start:start + size], transform)
    unreadable += bad
    if images:
      batch = np.stack(images)
      padded = np.concatenate([batch, np.zeros((size - len(batch), *batch.shape[1:]),
                                               batch.dtype)])
      yield names, np.asarray(outputs_fn(variables, padded))[:len(batch)]


def predict(config: ml_collections.ConfigDict, workdir: Optional[str], paths: Sequence[str],
            top_k: int = 5) -> Predictions:
  """Top-k classes of every image file under `paths`, decoded and scored up to BATCH files at a
  time."""
  config_validation.validate(config, jax.device_count(), data=False)
  return predict_files(RunSettings.from_config(config), workdir, image_files(paths), top_k)


def predict_files(settings: RunSettings, workdir: Optional[str], files: Sequence[str],
                  top_k: int = 5) -> Predictions:
  """`predict` on a validated config's settings and a list of files."""
  data, state = inference_model(settings, workdir)
  k = min(top_k, data.info.num_classes)
  kept, unreadable, top_classes, top_probabilities = [], [], [], []
  for names, logits in _outputs(files, data, state, 'predict', unreadable):
    kept += names
    # Ranked by logits: probabilities that round to 0 or 1 would tie.
    order = np.argsort(-logits, axis=1, kind='stable')[:, :k]
    top_classes.append(order)
    top_probabilities.append(np.take_along_axis(np.asarray(jax.nn.softmax(logits)), order, 1))
  class_names = list(data.info.class_names)
  if not kept:
    return Predictions([], np.zeros((0, k), int), np.zeros((0, k)), class_names, unreadable)
  return Predictions(kept, np.concatenate(top_classes), np.concatenate(top_probabilities),
                     class_names, unreadable)


@dataclasses.dataclass
class Embeddings:
  files: list  # the files that decoded, in the order of the rows of `features`
  features: np.ndarray  # float32 [files, num_features]: the pooled features, the classifier's input
  unreadable: list  # (file, reason)

  def save(self, path: str):
    """`path` (.npy) and the list of its rows' files next to it (PATH without .npy + .files.txt),
    each written under a temporary name and renamed when complete."""
    weights.write_atomically(path, lambda f: np.save(f, self.features))
    listing = ''.join(f'{name}\n' for name in self.files).encode()
    weights.write_atomically(files_list_path(path), lambda f: f.write(listing))


def files_list_path(embeddings_path: str) -> str:
  return os.path.splitext(embeddings_path)[0] + '.files.txt'


def embed(config: ml_collections.ConfigDict, workdir: Optional[str],
          paths: Sequence[str]) -> Embeddings:
  """The pooled features (the headless model's output) of every image file under `paths`."""
  config_validation.validate(config, jax.device_count(), data=False)
  settings = RunSettings.from_config(config)
  data, state = inference_model(settings, workdir)
  state = run_setup.headless(state, settings.model)
  kept, unreadable, features = [], [], []
  for names, outputs in _outputs(image_files(paths), data, state, 'embed', unreadable):
    kept += names
    features.append(outputs)
  width = state.params['head_norm']['scale'].shape[0]
  return Embeddings(kept, np.concatenate(features) if features else np.zeros((0, width),
                                                                             np.float32),
                    unreadable)
