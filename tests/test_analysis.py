"""densenet_jax.analysis: Figure 5 against a hand computation, checkpoint reading and plots."""

import csv
import math
import os

import jax
import numpy as np
import pytest
from matplotlib import image as mpimg

from densenet_jax import analysis, checkpoints, costs, models, steps

NAN = math.nan


def hand_set(params: dict, scales: dict) -> dict:
  """Every kernel of `scales` set to w[..., c, o] = scale * (c + 1) * (-1) ** (c + o).

  The mean |w| over input channels [a, b) is then scale * (a + b + 1) / 2.
  """
  params = jax.tree.map(np.asarray, params)
  for path, scale in scales.items():
    node = params
    for part in path.split('/')[:-1]:
      node = node[part]
    shape = node['kernel'].shape
    c = np.arange(shape[-2])[:, None]
    o = np.arange(shape[-1])[None, :]
    node['kernel'] = np.broadcast_to(scale * (c + 1) * (-1.0) ** (c + o), shape).copy()
  return params


def random_variables(model, seed=0):
  """Variables of the model's structure, drawn at random (no init, nothing compiled)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                                costs.init_shapes(model, 8))


def init_params(model):
  return random_variables(model)['params']


def test_feature_reuse_equals_a_hand_computation():
  # Block 1: stem 3 channels, k = 2, two layers: sources 0..2 are input channels [0, 3), [3, 5),
  # [5, 7), so the mean of (c + 1) over them is 2, 4.5 and 6.5. Transition 1 keeps 7 channels.
  # Block 2: sources [0, 7), [7, 9), [9, 11), [11, 13): means 4, 8.5, 10.5, 12.5.
  model = models.DenseNet(block_sizes=(2, 3), growth_rate=2, stem_features=3, num_classes=4)
  params = hand_set(init_params(model), {
      'block1/layer1/composite/conv/kernel': 1, 'block1/layer2/composite/conv/kernel': 2,
      'transition1/composite/conv/kernel': 10, 'block2/layer1/composite/conv/kernel': 3,
      'block2/layer2/composite/conv/kernel': 4, 'block2/layer3/composite/conv/kernel': 5,
      'classifier/kernel': 1})
  blocks = analysis.feature_reuse(params)
  assert [(b.last, b.bottleneck) for b in blocks] == [('transition', False), ('classifier', False)]
  np.testing.assert_allclose(blocks[0].matrix, [[2, 4, 20],
                                                [NAN, 9, 45],
                                                [NAN, NAN, 65]])
  np.testing.assert_allclose(blocks[1].matrix, [[12, 16, 20, 4],
                                                [NAN, 34, 42.5, 8.5],
                                                [NAN, NAN, 52.5, 10.5],
                                                [NAN, NAN, NAN, 12.5]])


def test_feature_reuse_of_a_bottleneck_model_reads_the_1x1_convs():
  model = models.DenseNet(block_sizes=(2,), growth_rate=2, stem_features=3, bottleneck=True)
  params = hand_set(init_params(model), {
      'block1/layer1/bottleneck/conv/kernel': 1, 'block1/layer2/bottleneck/conv/kernel': 2,
      'block1/layer1/composite/conv/kernel': 1000, 'block1/layer2/composite/conv/kernel': 1000,
      'classifier/kernel': 1})
  [block] = analysis.feature_reuse(params)
  assert block.bottleneck and block.last == 'classifier'
  np.testing.assert_allclose(block.matrix, [[2, 4, 2], [NAN, 9, 4.5], [NAN, NAN, 6.5]])


def test_feature_reuse_rejects_kernels_that_do_not_fit_the_block():
  model = models.DenseNet(block_sizes=(2,), growth_rate=2, stem_features=3)
  params = jax.tree.map(np.asarray, init_params(model))
  params['classifier']['kernel'] = params['classifier']['kernel'][:6]
  with pytest.raises(ValueError, match='6 input channels does not read exactly the 7 channels'):
    analysis.feature_reuse(params)
  with pytest.raises(ValueError, match='no dense blocks'):
    analysis.feature_reuse({'classifier': params['classifier']})


HISTORY = [{'step': 10 * i, 'epoch': float(i),
            'eval': {'validation': {'top1_error': 0.5 / i, 'loss': 2.0 / i, 'count': 10},
                     'test': {'top1_error': 0.6 / i, 'loss': 2.5 / i, 'count': 10}},
            'train': {'top1_error': 0.4 / i, 'loss': 1.5 / i, 'learning_rate': 0.1}}
           for i in (1, 2, 3)]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A run's folder with three checkpoints of a tiny DenseNet-BC, as train.py writes them."""
  workdir = str(tmp_path_factory.mktemp('run'))
  model = models.DenseNet(block_sizes=(2, 2, 2), growth_rate=4, bottleneck=True,
                          compression=0.5)
  variables = random_variables(model)
  state = steps.TrainState.create(apply_fn=model.apply, params=variables['params'],
                                  batch_stats=variables['batch_stats'],
                                  tx=steps.sgd_nesterov(0.1, 0.9, 1e-4),
                                  dropout_rng=jax.random.key(0))  # as train.py makes it
  ckpt = checkpoints.Checkpoints(os.path.join(workdir, 'checkpoints'))
  for i, entry in enumerate(HISTORY):
    scale = lambda x, i=i: x * (i + 1)  # pylint: disable=unnecessary-lambda-assignment
    ckpt.save(state.replace(step=entry['step'],
                            params=jax.tree.map(scale, state.params)),
              {'history': HISTORY[:i + 1]},
              selection_error=entry['eval']['validation']['top1_error'])
  ckpt.wait()
  ckpt.close()
  return workdir, state


def test_history_and_variables_come_from_the_checkpoints(workdir):
  workdir, state = workdir
  assert analysis.read_history(workdir) == HISTORY
  variables, step = analysis.restore_variables(workdir)
  assert step == 30
  np.testing.assert_array_equal(variables['params']['classifier']['kernel'],
                                3 * np.asarray(state.params['classifier']['kernel']))
  variables, _ = analysis.restore_variables(workdir, step=10)
  np.testing.assert_array_equal(variables['batch_stats']['head_norm']['var'],
                                state.batch_stats['head_norm']['var'])
  with pytest.raises(ValueError, match=r'step=15 is not a checkpoint .* \[10, 20, 30\]'):
    analysis.restore_variables(workdir, step=15)
  with pytest.raises(ValueError, match='has no checkpoints/ folder'):
    analysis.read_history(os.path.dirname(workdir))


def test_training_curves_plot_every_split(workdir):
  fig = analysis.plot_training_curves(analysis.read_history(workdir[0]))
  error_axes, loss_axes = fig.axes
  assert [line.get_label() for line in error_axes.get_lines()] == ['train', 'validation', 'test']
  np.testing.assert_allclose(error_axes.get_lines()[2].get_ydata(), [60, 30, 20])
  np.testing.assert_allclose(loss_axes.get_lines()[0].get_xdata(), [1, 2, 3])


def test_command_renders_the_figures_of_a_run(workdir, tmp_path, capsys):
  analysis.main([f'--workdir={workdir[0]}', f'--out={tmp_path}', '--step=20'])
  paths = capsys.readouterr().out.split()
  assert [os.path.basename(p) for p in paths] == ['training_curves.png', 'feature_reuse.png']
  for path in paths:
    pixels = mpimg.imread(path)
    assert pixels.shape[0] > 300 and pixels[..., :3].std() > 0.05  # drawn, not blank


def test_feature_reuse_plot_has_a_heatmap_per_block(workdir):
  variables, _ = analysis.restore_variables(workdir[0])
  blocks = analysis.feature_reuse(variables['params'])
  assert [b.matrix.shape for b in blocks] == [(3, 3)] * 3 and blocks[0].bottleneck
  fig = analysis.plot_feature_reuse(blocks)
  heatmaps = [ax for ax in fig.axes if ax.images]
  assert len(heatmaps) == 3 and '1x1 bottleneck conv' in fig._suptitle.get_text()
  assert [t.get_text() for t in heatmaps[2].get_xticklabels()] == ['1', '2', 'C']


def test_error_vs_params_draws_a_line_per_variant(tmp_path):
  rows = [dict(variant=v, dataset='cifar10', depth=d, growth_rate=12, model='m', num_params=p,
               gmacs=g, error_pct=e, error_split='test')
          for v, d, p, g, e in [('DenseNet', 40, 1e6, 0.3, 7.0), ('DenseNet', 100, 7e6, 2.0, 5.8),
                                ('DenseNet-BC', 100, 0.8e6, 0.3, 5.9)]]
  path = tmp_path / 'results.csv'
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  fig = analysis.plot_error_vs(analysis.read_sweep_csv(str(path)), 'num_params')
  lines = fig.axes[0].get_lines()
  assert [line.get_label() for line in lines] == ['DenseNet', 'DenseNet-BC']
  np.testing.assert_allclose(lines[0].get_xdata(), [1, 7])  # millions
  np.testing.assert_allclose(lines[0].get_ydata(), [7.0, 5.8])
  assert fig.axes[0].get_ylabel() == 'test error (%)'
  assert [os.path.basename(p) for p in analysis.render_sweep(str(path))] == [
      'error_vs_params.png', 'error_vs_flops.png']
  with pytest.raises(ValueError, match="x='depth': allowed: num_params, gmacs"):
    analysis.plot_error_vs(rows, 'depth')
