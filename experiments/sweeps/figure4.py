"""Figure 4 (left): C10+ test error vs parameters of DenseNet, -B, -C and -BC (12 runs).

  python experiments/sweep.py --sweep_file=experiments/sweeps/figure4.py --root=runs/figure4

Run from the repository root. k = 12 at depths 40, 64 and 100 (each valid with and without
bottleneck layers), 300 epochs of C10+ with the paper's recipe; the paper does not list the
depths of its Figure 4 points, so these are a choice. Plot: the sweep writes
ROOT/error_vs_params.png (python -m densenet_jax.analysis --sweep=ROOT/results.csv redraws it).
"""

CONFIG = 'configs/cifar.py:densenet40_k12,c10+'
AXES = [
    # zipped: DenseNet, DenseNet-B, DenseNet-C, DenseNet-BC
    {'model.bottleneck': [False, True, False, True], 'model.compression': [1.0, 1.0, 0.5, 0.5]},
    {'model.depth': [40, 64, 100]},
]
