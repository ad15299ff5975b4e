"""The datasets the input pipeline serves and the options each one takes, as plain data.

TensorFlow-free (as are the configs and config_validation), so a config is checked in seconds;
the input pipeline and the preprocessing read the same tables. Sources: docs/reference.md.
"""

DATASETS = ('digits', 'cifar10', 'cifar100', 'svhn_cropped', 'imagenet2012')
# Datasets that hold out a validation split from their training set when asked
# (holdout_validation=True); svhn_cropped always holds one out, as the paper does.
OPTIONAL_HOLDOUT = ('cifar10', 'cifar100')
ALWAYS_HOLDOUT = ('svhn_cropped',)
NOT_AUGMENTED = ('svhn_cropped',)  # the paper trains SVHN without augmentation
UPSCALABLE = ('digits',)  # image_size: the 8x8 digits may be upscaled
TEN_CROP = ('imagenet2012',)  # 10-crop evaluation
# ImageNet resizes: bicubic (Torch's image.scale, the paper's) or antialiased bilinear (PIL's,
# which torchvision's published accuracies used): the eval_resize values.
RESIZE_METHODS = ('bicubic', 'bilinear')

# Image folders ('folder:PATH', config.folder): the values of their transform fields.
FOLDER_AUGMENTATIONS = ('none', 'translate', 'imagenet')
FOLDER_EVAL_TRANSFORMS = ('resize_center_crop', 'resize')
# imagenet: ImageNet's mean/std (what pretrained weights expect); folder: computed once from
# the training split; unit: pixels / 255 only.
FOLDER_NORMALIZATIONS = ('imagenet', 'folder', 'unit')
FOLDER_IMAGE_SIZE = 224  # the input size when config.image_size is not set

# How each dataset's uint8 pixels become the model's input: (scale, mean, std) per channel,
# x = (pixels / scale - mean) / std. CIFAR's statistics are on the 0..255 scale, ImageNet's on
# 0..1 (fb.resnet.torch); digits' pixels are 0..16 and go to [0, 1], SVHN's to [0, 1].
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMALIZATION = {
    'digits': (16.0, (0.0,), (1.0,)),
    'cifar10': (1.0, (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
    'cifar100': (1.0, (129.3, 124.1, 112.4), (68.2, 65.4, 70.4)),
    'svhn_cropped': (255.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    'imagenet2012': (255.0, IMAGENET_MEAN, IMAGENET_STD),
}
# The paper's random shifts: zero padding in the normalized image (CIFAR: the mean pixel).
CIFAR_PAD = 4
DIGITS_PAD = 1
