"""DenseNet-169 (k=32, blocks 6-12-32-32, 14,149,480 parameters) on ImageNet, Table 3 of the paper.

  python main.py --config=configs/imagenet_densenet169.py --workdir=runs/densenet169

Batch 256, 90 epochs, SGD Nesterov 0.9, weight decay 1e-4, lr 0.1 divided by 10 at epochs 30
and 60, fb.resnet.torch augmentation. Paper: 23.80% top-1 / 6.85% top-5 validation error single-crop,
22.08% / 5.92% 10-crop (--mode=evaluate --config.ten_crop=True). The paper's Torch runs computed BN
statistics per GPU (4 GPUs x 64 images): --config.cross_replica_bn=False on 4 devices.
"""

from configs import common


def get_config():
  return common.imagenet_config('densenet169')
