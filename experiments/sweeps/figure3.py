"""Figure 3 (right): ImageNet top-1 validation error vs FLOPs of DenseNet-121, -169, -201, -264.

  python experiments/sweep.py --sweep_file=experiments/sweeps/figure3.py --root=runs/figure3

Run from the repository root, with imagenet2012 prepared (see configs/imagenet_densenet121.py).
Single center-crop error after the paper's 90 epochs; the sweep writes ROOT/error_vs_flops.png.
"""

AXES = [{'config': [f'configs/imagenet_densenet{n}.py' for n in (121, 169, 201, 264)]}]
