"""A run's config read once, into the typed values the layers below take.

`RunSettings.from_config(config)` is the only reader of a config's fields below the entry
points (main.py, the sweep, the notebooks); train, evaluation, predict and the input pipeline
take these frozen dataclasses. It fills in what the config leaves open: the eval resize of
published weights (weights.Published.eval_resize) when config.eval_resize is None.

TensorFlow- and JAX-free, so a sweep checks its points in seconds.
"""

import dataclasses
import json
from typing import Optional

import ml_collections

from densenet_jax import architectures, datasets, folder_listing, weights


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """config.model (the network and DenseNet's options) and how BN statistics are shared."""
  fields: tuple  # ((name, value), ...) of config.model: models.build_model's keyword arguments
  cross_replica_bn: bool

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'ModelSettings':
    return cls(tuple(config.model.items()), config.cross_replica_bn)

  @property
  def architecture(self) -> architectures.Architecture:
    return architectures.from_fields(dict(self.fields))


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """SGD with Nesterov momentum and the step decay (steps.sgd_nesterov and
  steps.learning_rate_schedule)."""
  learning_rate: float
  lr_decay_epochs: tuple
  lr_decay_factor: float
  momentum: float
  weight_decay: float


@dataclasses.dataclass(frozen=True)
class RunSettings:
  model: ModelSettings
  data: datasets.DataOptions
  optimizer: OptimizerSettings
  batch_size: int  # global, over all devices of all processes
  eval_batch_size: int
  num_epochs: int
  eval_every_epochs: float
  log_every_steps: int
  keep_checkpoints: int
  seed: int
  eval_checkpoint: str  # 'best' or 'latest'
  init_from: str  # '' for none
  config_json: str  # the config, for results.json and TensorBoard

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'RunSettings':
    """The settings of a validated config (config_validation.validate)."""
    return cls(
        model=ModelSettings.from_config(config),
        data=data_options(config),
        optimizer=OptimizerSettings(config.learning_rate, tuple(config.lr_decay_epochs),
                                    config.lr_decay_factor, config.momentum,
                                    config.weight_decay),
        batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
        num_epochs=config.num_epochs, eval_every_epochs=config.eval_every_epochs,
        log_every_steps=config.log_every_steps, keep_checkpoints=config.keep_checkpoints,
        seed=config.seed, eval_checkpoint=config.eval_checkpoint,
        init_from=config.init_from or '',
        config_json=config.to_json_best_effort(indent=2))

  @property
  def config(self) -> dict:
    return json.loads(self.config_json)


def eval_resize(config_value: Optional[str], init_from: str) -> str:
  """config.eval_resize if set, else the published weights' own, else the default."""
  if config_value is not None:
    return config_value
  if init_from in weights.PUBLISHED:
    return weights.PUBLISHED[init_from].eval_resize
  return datasets.DEFAULT_EVAL_RESIZE


def data_options(config: ml_collections.ConfigDict) -> datasets.DataOptions:
  """What the run asks of its data (config.folder only for a 'folder:PATH' dataset)."""
  folder = (datasets.FolderOptions(**config.folder)
            if folder_listing.is_folder(config.dataset) else None)
  return datasets.DataOptions(
      dataset=config.dataset, data_dir=config.data_dir,
      holdout_validation=config.holdout_validation, image_size=config.image_size,
      augment=config.augment, ten_crop=config.ten_crop,
      eval_resize=eval_resize(config.eval_resize, config.init_from or ''), seed=config.seed,
      folder=folder)
