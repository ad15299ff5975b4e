"""PyTorch twins of densenet_jax's networks, for `benchmark.py --vs-torch`.

ImageNet models are torchvision's `DenseNet` class (its densenet121/169/201 constructors are
this class with the block sizes of models.py). CIFAR/SVHN models are `CifarDenseNet` below: the
same layers, widths and order as models.DenseNet with stem='cifar'. Both take `memory_efficient`:
concat-BN-ReLU-conv of each layer's first unit under torch.utils.checkpoint, as torchvision does.
"""

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
import torchvision
from torch import nn


class Unit(nn.Module):
  """BN -> ReLU -> Conv (no bias, padding (kernel - 1) / 2) -> dropout."""

  def __init__(self, in_channels, out_channels, kernel_size, dropout_rate):
    super().__init__()
    self.norm = nn.BatchNorm2d(in_channels)  # eps 1e-5, momentum 0.1, as models.py
    self.conv = nn.Conv2d(in_channels, out_channels, kernel_size,
                          padding=(kernel_size - 1) // 2, bias=False)
    self.dropout_rate = dropout_rate

  def forward(self, x):
    x = self.conv(F.relu(self.norm(x)))
    return F.dropout(x, self.dropout_rate, self.training) if self.dropout_rate else x


class DenseLayer(nn.Module):
  """H_l on the list of earlier feature maps: [Unit(1x1, 4k)] -> Unit(3x3, k)."""

  def __init__(self, in_channels, growth_rate, bottleneck, dropout_rate, memory_efficient):
    super().__init__()
    width = 4 * growth_rate if bottleneck else in_channels
    self.bottleneck = Unit(in_channels, width, 1, dropout_rate) if bottleneck else None
    self.composite = Unit(width, growth_rate, 3, dropout_rate)
    self.memory_efficient = memory_efficient

  def forward(self, features):
    first = self.bottleneck or self.composite

    def concat_unit(*features):
      return first(torch.cat(features, 1))

    if self.memory_efficient and torch.is_grad_enabled():
      x = torch.utils.checkpoint.checkpoint(concat_unit, *features, use_reentrant=False)
    else:
      x = concat_unit(*features)
    return self.composite(x) if self.bottleneck is not None else x


class CifarDenseNet(nn.Module):
  """Conv3x3 stem, dense blocks with transitions (floor(theta * m) channels), BN-ReLU-pool head."""

  def __init__(self, block_sizes, growth_rate, bottleneck, compression, stem_features,
               dropout_rate, num_classes, memory_efficient=False):
    super().__init__()
    self.stem = nn.Conv2d(3, stem_features, 3, padding=1, bias=False)
    self.blocks, self.transitions = nn.ModuleList(), nn.ModuleList()
    channels = stem_features
    for i, num_layers in enumerate(block_sizes):
      self.blocks.append(nn.ModuleList(
          DenseLayer(channels + j * growth_rate, growth_rate, bottleneck, dropout_rate,
                     memory_efficient) for j in range(num_layers)))
      channels += num_layers * growth_rate
      if i + 1 < len(block_sizes):
        width = int(math.floor(compression * channels))
        self.transitions.append(Unit(channels, width, 1, dropout_rate))
        channels = width
    self.head_norm = nn.BatchNorm2d(channels)
    self.classifier = nn.Linear(channels, num_classes)

  def forward(self, x):
    x = self.stem(x)
    for i, block in enumerate(self.blocks):
      features = [x]
      for layer in block:
        features.append(layer(features))
      if i < len(self.transitions):
        x = F.avg_pool2d(self.transitions[i](torch.cat(features, 1)), 2)
    x = F.relu(self.head_norm(torch.cat(features, 1)))
    return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(model) -> nn.Module:
  """The PyTorch network of a densenet_jax.models.DenseNet (same widths and parameter count)."""
  if model.stem == 'imagenet':
    if not model.bottleneck or model.compression != 0.5:
      raise ValueError(f'torchvision DenseNets are DenseNet-BC with theta=0.5, not '
                       f'bottleneck={model.bottleneck}, compression={model.compression}')
    return torchvision.models.DenseNet(
        growth_rate=model.growth_rate, block_config=tuple(model.block_sizes),
        num_init_features=model.num_stem_features, bn_size=4, drop_rate=model.dropout_rate,
        num_classes=model.num_classes, memory_efficient=model.memory_efficient)
  return CifarDenseNet(model.block_sizes, model.growth_rate, model.bottleneck, model.compression,
                       model.num_stem_features, model.dropout_rate, model.num_classes,
                       model.memory_efficient)
