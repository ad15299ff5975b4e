"""DenseNet-161 (k=48, stem 96, blocks 6-12-36-24, 28,681,000 parameters) on ImageNet.

  python main.py --config=configs/imagenet_densenet161.py --workdir=runs/densenet161

Batch 128, 100 epochs, lr 0.1 divided by 10 at epochs 30, 60 and 90 (the authors' recipe for
this model). The paper has no Table 3 row for it; the authors' Torch model reached 22.2% top-1
single-crop validation error (their README).
"""

from configs import common


def get_config():
  return common.imagenet_config('densenet161', batch_size=128, num_epochs=100,
                                lr_decay_epochs=(30, 60, 90))
