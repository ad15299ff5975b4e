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
