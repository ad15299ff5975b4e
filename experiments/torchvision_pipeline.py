"""torchvision's transforms.v2 on PIL images: the peer of pipeline_benchmark.py's ImageNet cases.

Runs in an interpreter with torch and torchvision (a separate venv); densenet_jax is not
imported. Train: decode, RandomResizedCrop(224, bicubic), ColorJitter(0.4, 0.4, 0.4), to float,
PCA lighting (fb.resnet.torch's), Normalize, RandomHorizontalFlip. Eval: decode, Resize(256,
bicubic), CenterCrop(224), to float, Normalize. Prints CPU-ms per image on one thread and on
all cores (a process pool, one thread each), as JSON after RESULT.

  python experiments/torchvision_pipeline.py FOLDER_OF_JPEGS
"""

import io
import json
import multiprocessing
import os
import sys
import time

import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

COUNT = 400  # images per thread
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EIGVAL = torch.tensor((0.2175, 0.0188, 0.0045))
EIGVEC = torch.tensor(((-0.5675, 0.7192, 0.4009),
                       (-0.5808, -0.0045, -0.8140),
                       (-0.5836, -0.6948, 0.4203)))
BICUBIC = v2.InterpolationMode.BICUBIC


class Lighting(torch.nn.Module):
  def forward(self, image):
    alpha = 0.1 * torch.randn(3)
    return image + (EIGVEC @ (alpha * EIGVAL))[:, None, None]


TRANSFORMS = {
    'ImageNet train': v2.Compose([
        v2.RandomResizedCrop(224, interpolation=BICUBIC), v2.ColorJitter(0.4, 0.4, 0.4),
        v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), Lighting(),
        v2.Normalize(MEAN, STD), v2.RandomHorizontalFlip()]),
    'ImageNet eval': v2.Compose([
        v2.Resize(256, interpolation=BICUBIC), v2.CenterCrop(224), v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]),
}


def work(args):
  """(CPU seconds, bytes per example) of `count` images through one transform."""
  case, jpegs, count = args
  torch.set_num_threads(1)
  transform = TRANSFORMS[case]
  out = transform(Image.open(io.BytesIO(jpegs[0])).convert('RGB'))  # warm-up
  start = time.process_time()
  for i in range(count):
    out = transform(Image.open(io.BytesIO(jpegs[i % len(jpegs)])).convert('RGB'))
  return time.process_time() - start, out.numel() * out.element_size() + 8  # + int64 label


def main():
  folder = sys.argv[1]
  jpegs = [open(os.path.join(folder, n), 'rb').read() for n in sorted(os.listdir(folder))]
  cores = len(os.sched_getaffinity(0))
  results = []
  for case in TRANSFORMS:
    cpu, nbytes = work((case, jpegs, COUNT))
    one = {'cpu_ms': 1000 * cpu / COUNT, 'images_per_s': COUNT / cpu,
           'bytes_per_example': nbytes, 'image_dtype': 'float32'}
    with multiprocessing.get_context('spawn').Pool(cores) as pool:
      wall = time.perf_counter()
      done = pool.map(work, [(case, jpegs, COUNT)] * cores)
      wall = time.perf_counter() - wall  # includes the workers' warm-up
    every = {'cpu_ms': 1000 * sum(c for c, _ in done) / (COUNT * cores),
             'images_per_s': COUNT * cores / wall}
    results.append({'case': case, 'one_thread': one, 'all_cores': every})
  print('RESULT ' + json.dumps({'version': torchvision.__version__, 'results': results}))


if __name__ == '__main__':
  main()
