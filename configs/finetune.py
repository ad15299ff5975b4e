"""Fine-tune ImageNet-pretrained DenseNet-121 (torchvision's weights) on your own image folder.

  python main.py --config=configs/finetune.py --config.dataset=folder:PATH --workdir=runs/mine
  python main.py --config=configs/finetune.py --mode=predict --workdir=runs/mine --images=NEW

PATH holds train/<class>/* (and optionally val/, test/; see the README's "Your own images").
The weights are downloaded once from torchvision's URL, checked and cached
(`densenet_jax/weights.py`); the 1000-class head is replaced by a new one for the folder's
classes. Result: not measured (this project's machine cannot download the weights and has no
accelerator); the recipe is the one below.

Recipe, and why. The project's optimizer (SGD, Nesterov momentum 0.9, weight decay 1e-4, the
paper's) at a learning rate of 0.01, ten times below training from scratch: the pretrained
features need small updates while the new head learns. This is a common starting point for SGD
fine-tuning, not a tuned value; Kornblith et al. (CVPR 2019) found fine-tuned ImageNet networks
transfer best when the learning rate is tuned per dataset, so sweep it
(--config.learning_rate=0.003 and 0.03) on your validation split. 30 epochs, decayed tenfold at
20 and 27: small folders converge within tens of epochs. Inputs as the weights were trained:
224x224, ImageNet normalization, resize + center crop 224/256 (antialiased bilinear,
torchvision's) for evaluation, fb.resnet.torch's random-sized crop, color jitter and lighting
for training; no flip unless your images are mirror-symmetric (--config.folder.flip=True). Batch
size and epochs are fields (--config.batch_size=64 --config.num_epochs=50); scale learning_rate
with the batch size; --config.model.dtype=bfloat16 for mixed precision.
"""

from configs import common


def get_config():
  config = common.base_config()
  config.model = common.named_model_config('densenet121')
  config.dataset = 'folder:PATH'  # set with --config.dataset=folder:PATH
  config.init_from = 'torchvision:densenet121'
  config.image_size = 224
  config.folder.augmentation = 'imagenet'
  config.folder.flip = False
  config.folder.normalization = 'imagenet'
  config.folder.eval_transform = 'resize_center_crop'
  config.folder.center_crop_ratio = 0.875
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_epochs = 30
  config.learning_rate = 0.01
  config.lr_decay_epochs = (20, 27)
  config.log_every_steps = 20
  return config
