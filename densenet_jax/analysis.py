"""The paper's analyses as PNG figures: training curves, error vs parameters / FLOPs, Figure 5.

  python -m densenet_jax.analysis --workdir=DIR  # DIR/training_curves.png, DIR/feature_reuse.png
  python -m densenet_jax.analysis --sweep=ROOT/results.csv  # ROOT/error_vs_{params,flops}.png

Runs are read from their checkpoints (the record of the latest one holds every eval so far, so a
run in progress can be plotted too); sweeps from the CSV that experiments/sweep.py writes.
"""

import argparse
import csv
import dataclasses
import math
import os
import re
from typing import Optional

import numpy as np
import orbax.checkpoint as ocp
from matplotlib import colormaps, patches
from matplotlib.figure import Figure

from densenet_jax import checkpoints

ERROR_COLUMN = 'error_pct'  # the sweep CSV's reported error (%), see experiments/sweep.py
X_COLUMNS = {'num_params': ('parameters (M)', 1e-6), 'gmacs': ('GFLOPs (multiply-adds)', 1.0)}


def _restore_item(workdir: str, item: str, args, step: Optional[int] = None):
  """(item of checkpoint `step` (default: the latest) of workdir, its step)."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise ValueError(f'workdir={workdir!r} has no checkpoints/ folder')
  ckpt = checkpoints.Checkpoints(directory, asynchronous=False)
  try:
    if not ckpt.manager.all_steps():
      raise ValueError(f'workdir={workdir!r} has no checkpoint yet')
    step = ckpt.latest_step() if step is None else step
    if step not in ckpt.manager.all_steps():
      raise ValueError(f'step={step!r} is not a checkpoint of {workdir!r}; '
                       f'saved steps: {ckpt.manager.all_steps()}')
    return ckpt.manager.restore(step, args=ocp.args.Composite(**{item: args}))[item], step
  finally:
    ckpt.close()


def read_history(workdir: str) -> list:
  """Every eval of a run: dicts with step, epoch, eval {split: metrics} and train metrics.

  The train metrics of an entry are the means over the last logging window before that eval.
  """
  record, _ = _restore_item(workdir, 'record', ocp.args.JsonRestore())
  return record['history']


def restore_variables(workdir: str, step: Optional[int] = None) -> tuple:
  """({'params', 'batch_stats'} of checkpoint `step` (default: latest), step); no model needed."""
  state, step = _restore_item(workdir, 'state', ocp.args.StandardRestore(), step)
  return {'params': state['params'], 'batch_stats': state['batch_stats']}, step


# ---------------------------------------------------------------------------------------------
# Training curves.

def plot_training_curves(history: list, path: Optional[str] = None) -> Figure:
  """Top-1 error (%) and loss vs epoch, for training and for every eval split (log scales)."""
  fig = Figure(figsize=(10, 4), layout='constrained')
  axes = fig.subplots(1, 2)
  epochs = [h['epoch'] for h in history]
  series = {'train': [h['train'] for h in history]}
  for split in history[-1]['eval']:
    series[split] = [h['eval'].get(split, {}) for h in history]
  for name, values in series.items():
    axes[0].plot(epochs, [100 * v.get('top1_error', math.nan) for v in values], '.-', label=name)
    axes[1].plot(epochs, [v.get('loss', math.nan) for v in values], '.-', label=name)
  for ax, ylabel in zip(axes, ('top-1 error (%)', 'loss')):
    ax.set_xlabel('epoch')
    ax.set_ylabel(ylabel)
    ax.set_yscale('log')
    ax.grid(alpha=0.3, which='both')
    ax.legend()
  return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Figure 5: feature reuse.

@dataclasses.dataclass
class FeatureReuse:
  """One dense block's heatmap: matrix[s, t] for source s = 0..L and target t.

  Targets t = 0..L-1 are the block's layers 1..L and t = L is `last` (the transition after the
  block, or the classifier after the last block); NaN where target t does not read source s.
  """
  matrix: np.ndarray
  last: str  # 'transition' or 'classifier'
  bottleneck: bool  # targets 0..L-1 are the layers' 1x1 bottleneck convs (DenseNet-B)


def _mean_abs_by_source(kernel, bounds: list) -> list:
  """Mean |w| over the input channels [bounds[s], bounds[s + 1]) of each source s."""
  kernel = np.abs(np.asarray(kernel, np.float64))
  kernel = kernel.reshape(-1, *kernel.shape[-2:])  # (spatial, in, out), in HWIO order
  if kernel.shape[1] != bounds[-1]:
    raise ValueError(f'a kernel with {kernel.shape[1]} input channels does not read exactly '
                     f'the {bounds[-1]} channels of sources 0..{len(bounds) - 2}')
  return [kernel[:, a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])]


def _layer_numbers(block: dict) -> list:
  return sorted(int(m.group(1)) for m in map(re.compile(r'layer(\d+)$').match, block) if m)


def feature_reuse(params: dict) -> list:
  """Figure 5 for every dense block of a DenseNet's params: one FeatureReuse per block.

  Entry (s, l): the average absolute weight that target l's convolution gives the feature maps
  of source s, i.e. mean |w| over the kernel's input channels that came from s (so normalized
  by the number of those feature maps) and over its spatial positions and outputs. Source 0 is
  the block input (the stem's or the previous transition's output), source s the output of
  layer s. For DenseNet-B the layer's conv that reads the concatenation is its 1x1 bottleneck.
  Raw conv weights: the BN scale in front of each conv is not folded in.
  """
  num_blocks = sum(1 for name in params if re.fullmatch(r'block\d+', name))
  if not num_blocks:
    raise ValueError(f'no dense blocks (block1, ...) in params with keys {sorted(params)}')
  result = []
  for b in range(1, num_blocks + 1):
    block = params[f'block{b}']
    layers = _layer_numbers(block)
    bottleneck = 'bottleneck' in block['layer1']
    reader = 'bottleneck' if bottleneck else 'composite'
    first = np.shape(block['layer1'][reader]['conv']['kernel'])
    growth = np.shape(block['layer1']['composite']['conv']['kernel'])[-1]
    bounds = [0, first[-2]] + [first[-2] + growth * s for s in range(1, len(layers) + 1)]
    matrix = np.full((len(layers) + 1, len(layers) + 1), np.nan)
    for t, l in enumerate(layers):
      matrix[:l, t] = _mean_abs_by_source(block[f'layer{l}'][reader]['conv']['kernel'],
                                          bounds[:l + 1])
    if b < num_blocks:
      last, kernel = 'transition', params[f'transition{b}']['composite']['conv']['kernel']
    else:
      last, kernel = 'classifier', params['classifier']['kernel']
    matrix[:, -1] = _mean_abs_by_source(kernel, bounds)
    result.append(FeatureReuse(matrix, last, bottleneck))
  return result


def plot_feature_reuse(blocks: list, path: Optional[str] = None) -> Figure:
  """The paper's Figure 5: one heatmap per dense block, its last column boxed."""
  fig = Figure(figsize=(4.2 * len(blocks), 4.2), layout='constrained')
  cmap = colormaps['jet'].with_extremes(bad='white')
  for b, (ax, block) in enumerate(zip(fig.subplots(1, len(blocks), squeeze=False)[0], blocks)):
    size = block.matrix.shape[0]
    image = ax.imshow(np.ma.masked_invalid(block.matrix), cmap=cmap, vmin=0)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.add_patch(patches.Rectangle((size - 1.5, -0.5), 1, size, fill=False, lw=2))
    every = math.ceil(size / 13)
    ticks = list(range(0, size - 1, every))
    ax.set_xticks(ticks + [size - 1], [str(t + 1) for t in ticks] + [block.last[0].upper()])
    ax.set_yticks(range(0, size, every))
    ax.set_xlabel(f'target layer (l); {block.last[0].upper()}: {block.last}')
    ax.set_ylabel('source layer (s)')
    ax.set_title(f'dense block {b + 1}')
  conv = '1x1 bottleneck conv' if blocks[0].bottleneck else 'conv'
  fig.suptitle(f'Mean |weight| of target l\'s {conv} on the feature maps of source s')
  return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Sweeps: error vs parameters (Figure 4) and vs FLOPs (Figure 3).

def read_sweep_csv(path: str) -> list:
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _point_label(row: dict) -> str:
  if row.get('depth'):
    return f'L={row["depth"]}, k={row["growth_rate"]}'
  return row['model']


def plot_error_vs(rows: list, x: str, path: Optional[str] = None) -> Figure:
  """Reported error (%) vs x ('num_params' or 'gmacs'): a line per variant (and dataset)."""
  if x not in X_COLUMNS:
    raise ValueError(f'x={x!r}: allowed: {", ".join(X_COLUMNS)}')
  if not rows:
    raise ValueError('no sweep results to plot')
  label, scale = X_COLUMNS[x]
  several_datasets = len({r['dataset'] for r in rows}) > 1
  groups = {}
  for row in rows:
    name = row['variant'] + (f' ({row["dataset"]})' if several_datasets else '')
    groups.setdefault(name, []).append(row)
  fig = Figure(figsize=(6, 4.5), layout='constrained')
  ax = fig.subplots()
  for name, group in groups.items():
    group.sort(key=lambda r: float(r[x]))
    xs = [float(r[x]) * scale for r in group]
    ys = [float(r[ERROR_COLUMN]) for r in group]
    ax.plot(xs, ys, 'o-', label=name)
    for r, xi, yi in zip(group, xs, ys):
      ax.annotate(_point_label(r), (xi, yi), textcoords='offset points', xytext=(4, 4),
                  fontsize=8)
  ax.set_xlabel(label)
  ax.set_ylabel(f'{rows[0]["error_split"]} error (%)')
  ax.set_title(', '.join(sorted({r['dataset'] for r in rows})))
  ax.grid(alpha=0.3)
  ax.legend()
  return _save(fig, path)


def _save(fig: Figure, path: Optional[str]) -> Figure:
  if path:
    fig.savefig(path, dpi=100)
  return fig


def render_run(workdir: str, out_dir: Optional[str] = None, step: Optional[int] = None) -> list:
  """training_curves.png and feature_reuse.png of a run; returns their paths."""
  out_dir = out_dir or workdir
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, 'training_curves.png'), os.path.join(out_dir,
                                                                      'feature_reuse.png')]
  plot_training_curves(read_history(workdir), paths[0])
  variables, _ = restore_variables(workdir, step)
  plot_feature_reuse(feature_reuse(variables['params']), paths[1])
  return paths


def render_sweep(csv_path: str, out_dir: Optional[str] = None) -> list:
  """error_vs_params.png and error_vs_flops.png of a sweep's CSV; returns their paths."""
  out_dir = out_dir or os.path.dirname(os.path.abspath(csv_path))
  os.makedirs(out_dir, exist_ok=True)
  rows = read_sweep_csv(csv_path)
  paths = []
  for x, name in (('num_params', 'error_vs_params.png'), ('gmacs', 'error_vs_flops.png')):
    paths.append(os.path.join(out_dir, name))
    plot_error_vs(rows, x, paths[-1])
  return paths


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', help='a run: plot its training curves and Figure 5')
  parser.add_argument('--sweep', help='a sweep\'s results.csv: plot error vs params and FLOPs')
  parser.add_argument('--out', help='output folder (default: beside the input)')
  parser.add_argument('--step', type=int, help='checkpoint step for Figure 5 (default: latest)')
  args = parser.parse_args(argv)
  if not args.workdir and not args.sweep:
    parser.error('give --workdir and/or --sweep')
  paths = []
  if args.workdir:
    paths += render_run(args.workdir, args.out, args.step)
  if args.sweep:
    paths += render_sweep(args.sweep, args.out)
  print('\n'.join(paths))


if __name__ == '__main__':
  main()
