"""Table 2: every model of the paper on C10, C10+, C100, C100+ and SVHN (the 27 runs it reports).

  python experiments/sweep.py --sweep_file=experiments/sweeps/table2.py --root=runs/table2

Run from the repository root. Each point is configs/cifar.py:MODEL,DATASET with the paper's
recipe; the CSV's paper_error_pct column holds the paper's number beside each result.
"""

from densenet_jax import architectures

AXES = [{'config': [f'configs/cifar.py:{model},{dataset}'
                    for model, errors in architectures.TABLE2.items()
                    for dataset, error in zip(architectures.TABLE2_COLUMNS, errors)
                    if error is not None]}]
