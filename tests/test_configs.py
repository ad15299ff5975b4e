"""Every Table 2 and Table 3 config has the paper's hyperparameters and validates for 8 devices;
the train step of each kind of config (DenseNet, DenseNet-BC, ImageNet) traces, at two layers
per dense block."""

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import pytest

from configs import cifar
from densenet_jax import architectures, config_validation, inference, models, run_setup, steps
from densenet_jax.settings import ModelSettings


def architecture_of(config) -> architectures.Architecture:
  return ModelSettings.from_config(config).architecture


def create_model_from_config(config, num_classes: int) -> models.DenseNet:
  return run_setup.build_model(ModelSettings.from_config(config), num_classes)

TABLE2 = [(m, d) for m in architectures.TABLE2 for d in architectures.TABLE2_COLUMNS]
EIGHT_DEVICES = 8  # one GPU server or TPU host: every config must run there unchanged
TABLE3 = {'121': (256, 90, (30, 60)), '169': (256, 90, (30, 60)), '201': (256, 90, (30, 60)),
          '264': (256, 90, (30, 60)), '161': (128, 100, (30, 60, 90))}


def _check_common_recipe(config):
  assert config.learning_rate == 0.1 and config.momentum == 0.9
  assert config.weight_decay == 1e-4 and config.lr_decay_factor == 0.1


@pytest.mark.parametrize('model_name,dataset', TABLE2)
def test_table2_config_has_the_paper_hyperparameters(model_name, dataset):
  config = cifar.get_config(f'{model_name},{dataset}')
  _check_common_recipe(config)
  augment = dataset.endswith('+')
  epochs = 40 if dataset == 'svhn' else 300
  assert config.batch_size == 64 and config.num_epochs == epochs
  assert tuple(config.lr_decay_epochs) == (epochs // 2, epochs * 3 // 4)
  assert config.augment == augment
  assert config.model.dropout_rate == (0.0 if augment else 0.2)
  assert config.dataset == {'c': 'cifar', 's': 'svhn_cropped'}[dataset[0]] + (
      '' if dataset == 'svhn' else ('100' if '100' in dataset else '10'))
  assert config.holdout_validation == (dataset == 'svhn')
  assert architecture_of(config) == architectures.NAMED[model_name]
  model = create_model_from_config(config, num_classes=10)
  assert model == models.create_model(model_name, num_classes=10, dropout_rate=model.dropout_rate,
                                      axis_name=inference.AXIS_NAME)
  config_validation.validate(config, EIGHT_DEVICES)


def _paper(arg):
  config = cifar.get_config(arg)
  return architectures.paper_result(architecture_of(config), config.dataset, config.augment)


def test_table2_paper_errors_follow_the_configs():
  assert _paper('densenet_bc190_k40,c100+') == {'source': 'Table 2, C100+',
                                                 'top1_error_pct': 17.18}
  assert _paper('densenet40_k12,svhn') == {'source': 'Table 2, SVHN', 'top1_error_pct': 1.79}
  assert _paper('densenet_bc190_k40,c10') is None
  assert _paper('densenet40_k12,c10+,quick') is None  # depth 7 is not the row's network


@pytest.mark.parametrize('name', list(TABLE3))
def test_table3_config_has_the_paper_hyperparameters(name):
  config = importlib.import_module(f'configs.imagenet_densenet{name}').get_config()
  _check_common_recipe(config)
  batch, epochs, decays = TABLE3[name]
  assert (config.batch_size, config.num_epochs, tuple(config.lr_decay_epochs)) == (
      batch, epochs, decays)
  assert config.dataset == 'imagenet2012' and config.augment
  assert config.model.dropout_rate == 0.0
  assert architecture_of(config) == architectures.NAMED[f'densenet{name}']
  model = create_model_from_config(config, num_classes=1000)
  assert model == models.create_model(f'densenet{name}', num_classes=1000,
                                      axis_name=inference.AXIS_NAME)
  config_validation.validate(config, EIGHT_DEVICES)


def test_bad_config_arguments_are_clear_errors():
  with pytest.raises(ValueError, match=r"model 'densenet42' is not in Table 2; choose from"):
    cifar.get_config('densenet42,c10')
  with pytest.raises(ValueError, match=r"'densenet40_k12,c20'.*one of c10, c10\+, c100"):
    cifar.get_config('densenet40_k12,c20')


def _trace_train_step(config, num_classes, image_shape):
  config.cross_replica_bn = False  # traced without pmap: no axis to average over
  # Two layers per block: the code traced depends on the config's kind, not on its depth.
  architecture = architecture_of(config)
  short = dataclasses.replace(architecture, block_sizes=(2,) * len(architecture.block_sizes))
  if 'depth' in config.model:
    config.model.depth = short.depth
  else:
    config.model.block_sizes = short.block_sizes
  assert architecture_of(config) == short
  model = create_model_from_config(config, num_classes)
  lr_fn = steps.learning_rate_schedule(config.learning_rate, 100, config.lr_decay_epochs)
  tx = steps.sgd_nesterov(lr_fn, config.momentum, config.weight_decay)
  state = jax.eval_shape(lambda: steps.create_train_state(model, jax.random.key(0),
                                                          image_shape, tx))
  batch = {'image': jax.ShapeDtypeStruct((2, *image_shape), jnp.float32),
           'label': jax.ShapeDtypeStruct((2,), jnp.int32)}
  step = functools.partial(steps.train_step, learning_rate_fn=lr_fn, axis_name=None)
  new_state, metrics = jax.eval_shape(step, state, batch)
  assert jax.tree.structure(new_state.params) == jax.tree.structure(state.params)
  assert metrics['loss'].shape == ()


# The train step is traced for one config of each kind, with two layers per dense block: the
# code a config runs depends on its kind (stem, bottleneck, compression, dropout, image size,
# classes, optimizer), not on its depth or growth rate, and tracing a config's full depth costs
# 8-15 s of Python (DenseNet-40, -BC-100, -121). Every config's forward pass is traced at its
# own size by its parameter count (test_models.py).
@pytest.mark.parametrize('model_name', ['densenet40_k12', 'densenet_bc100_k12'])
def test_table2_train_step_traces(model_name):
  config = cifar.get_config(f'{model_name},c10')  # dropout on: the dropout path traces too
  _trace_train_step(config, 10, (32, 32, 3))


def test_table3_train_step_traces():
  config = importlib.import_module('configs.imagenet_densenet121').get_config()
  _trace_train_step(config, 1000, (224, 224, 3))
