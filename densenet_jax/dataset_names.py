"""Names of the datasets the input pipeline serves; TensorFlow-free, so configs are checked fast."""

DATASETS = ('digits', 'cifar10', 'cifar100', 'svhn_cropped', 'imagenet2012')
