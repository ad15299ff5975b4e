"""Figure 4 in miniature on the bundled digits: DenseNet and DenseNet-BC at two depths, 4 runs.

  python experiments/sweep.py --sweep_file=experiments/sweeps/digits.py --root=runs/digits_sweep

k = 12 on the 8x8 digits upscaled to 16x16, 16 epochs each (lr / 10 after 8 and 12). The
example figures in docs/ come from this sweep.
"""

CONFIG = 'configs/digits.py'
AXES = [
    {'model.bottleneck': [False, True], 'model.compression': [1.0, 0.5]},  # zipped: 2 variants
    {'model.depth': [10, 22]},
    {'num_epochs': [16], 'lr_decay_epochs': [(8, 12)]},
]
