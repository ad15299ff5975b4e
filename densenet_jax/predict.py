"""--mode=predict: the top-k classes of image files, with names and probabilities.

The model is a run's best (or latest) checkpoint (--workdir) or config.init_from's weights; each
image gets the eval transform the model was trained with (the dataset's, as the eval step sees
it; a folder run's as recorded in its workdir, so the data may have moved since). Class names:
the run's classes.json, else ImageNet's (data/imagenet_classes.tsv) for 1,000-class ImageNet
models, else the dataset's.
"""

import csv
import dataclasses
import os
from typing import Optional, Sequence

import jax
import numpy as np
import tensorflow as tf
import tqdm

from densenet_jax import folder_listing, input_pipeline, steps, train
from densenet_jax import preprocessing as pp
from densenet_jax.datasets import NORMALIZATION

IMAGENET_CLASSES = os.path.join(os.path.dirname(__file__), 'data', 'imagenet_classes.tsv')
BATCH = 32  # images per forward pass (the last one padded: one compile)


def imagenet_classes() -> list:
  """[(WordNet id, names)] of ImageNet's 1,000 classes in label order."""
  with open(IMAGENET_CLASSES) as f:
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
      raise FileNotFoundError(f'--images: {path}: no such file or directory')
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


def _data(config, workdir: Optional[str]):
  """(DatasetInfo for the model, fn(encoded bytes) -> uint8 eval image, the device's
  transform of those images)."""
  record = train.read_classes(workdir) if workdir else None
  if record is not None:
    names, shape = record['class_names'], tuple(record['image_shape'])
    normalization = record.get('normalization') or NORMALIZATION.get(config.dataset)
  elif config.dataset == 'imagenet2012':
    names, shape = [n for _, n in imagenet_classes()], (pp.CROP_SIZE, pp.CROP_SIZE, 3)
    normalization = NORMALIZATION['imagenet2012']
  else:
    info = train.dataset_info_of(config)
    names, shape, normalization = list(info.class_names), info.image_shape, info.normalization
  host_transform = record.get('folder_transform') if record is not None else None
  if host_transform is not None and 'mean' in host_transform:  # a run of an earlier version
    normalization = (255.0, host_transform.pop('mean'), host_transform.pop('std'))
  info = input_pipeline.DatasetInfo(config.dataset, len(names), shape, 0, {}, (), tuple(names),
                                    tuple(normalization))
  device_transform = input_pipeline.device_transform(info, train=False)
  if host_transform is not None:
    return info, lambda encoded: pp.folder_eval(encoded, **host_transform), device_transform
  preprocess = input_pipeline.example_preprocessor(
      config.dataset, train=False, eval_resize=config.eval_resize, image_size=config.image_size,
      folder_options=train.data_options(config)['folder_options'])
  return (info, lambda encoded: preprocess({'image': encoded, 'label': 0})['image'],
          device_transform)


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


def predict(config, workdir: Optional[str], paths: Sequence[str], top_k: int = 5) -> Predictions:
  """Top-k classes of every image file under `paths`, decoded and scored BATCH files at a
  time (host memory stays that of one batch however many files there are)."""
  info, transform, device_transform = _data(config, workdir)
  state = train.state_for_evaluation(config, workdir, info)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits_fn = jax.jit(lambda v, x: state.apply_fn(
      v, steps.model_input(device_transform, {'image': x}), train=False))
  files = image_files(paths)
  k = min(top_k, info.num_classes)
  kept, unreadable, top_classes, top_probabilities = [], [], [], []
  for start in tqdm.trange(0, len(files), BATCH, desc='predict', disable=len(files) <= BATCH):
    names, images, bad = _load(files[start:start + BATCH], transform)
    kept += names
    unreadable += bad
    if not images:
      continue
    batch = np.stack(images)
    padded = np.concatenate([batch, np.zeros((BATCH - len(batch), *batch.shape[1:]),
                                             batch.dtype)])
    logits = np.asarray(logits_fn(variables, padded))[:len(batch)]
    # Ranked by logits: probabilities that round to 0 or 1 would tie.
    order = np.argsort(-logits, axis=1, kind='stable')[:, :k]
    top_classes.append(order)
    top_probabilities.append(np.take_along_axis(np.asarray(jax.nn.softmax(logits)), order, 1))
  if not kept:
    return Predictions([], np.zeros((0, k), int), np.zeros((0, k)), list(info.class_names),
                       unreadable)
  return Predictions(kept, np.concatenate(top_classes), np.concatenate(top_probabilities),
                     list(info.class_names), unreadable)
