"""Train-step benchmark: plain vs memory-efficient, float32 vs bfloat16, JAX vs PyTorch.

For one named model, batch size and resolution, each case (mode x implementation x dtype x
input, and with --vs-torch the same step in PyTorch) runs in a fresh Python process, so that
peak memory is its own. Implementations (JAX): `shared`, the dense blocks on one buffer
(shared_block.py, the default), `concat`, the module version. Inputs (JAX): `uint8`, the batches train.py feeds, with the device's normalization and
augmentation in the step (ImageNet's color jitter, lighting and flip at 224x224 and above,
CIFAR's shift and flip below); `float32`, the bare step fed normalized float32 images.

  step time    median of --steps timed steps after --warmup steps; images/s from it; also the
               best step and the median process CPU time (all threads) of a step
  compile      JAX: lowering and XLA compile of the jitted train step; torch.compile: first step
  residuals    bytes the forward pass saves for the backward pass (costs.saved_activation_bytes),
               the same on every backend; torch: the distinct tensors autograd saves
               (torch_saved_bytes)
  XLA temp     temporaries of the step compiled as train.py does, with steps.compiler_options
               (compiled.memory_analysis())
  peak         GPU: the device's peak_bytes_in_use (torch: max_memory_allocated);
               CPU: peak resident set size of the process while stepping (after compile and
               steps.release_freed_heap, which both frameworks get)
  accounting   CPU: resident memory after imports, after building the state, after compiling,
               after the release, against params + optimizer state, residuals and temporaries

Synthetic data, models.py, costs.py and steps.py only: no TensorFlow, tfds, ml_collections or clu is
imported. Prints a Markdown table (and our/their images/s ratios) and writes --json.

  python experiments/benchmark.py --model densenet_bc100_k12 --batch-size 64
  python experiments/benchmark.py --model densenet121 --batch-size 256 --dtypes bfloat16 \\
      --vs-torch --json densenet121.json
  python experiments/benchmark.py --report a.json b.json   # one table from earlier runs
  python experiments/benchmark.py --model densenet_bc100_k12 --steps 0 --torch-only \
      --torch-runtimes eager --residuals-by-depth 40,70,100  # residual bytes per added layer
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]  # densenet_jax, torch_densenet
MODES = ('plain', 'memory_efficient')
DTYPES = ('float32', 'bfloat16')
INPUTS = ('uint8', 'float32')
TORCH_RUNTIMES = ('eager', 'compile')
CIFAR_TRAIN_IMAGES, CIFAR_EPOCHS = 50_000, 300  # the paper's C10+ run


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', help='a name from densenet_jax.architectures.NAMED')
  p.add_argument('--batch-size', type=int, default=64)
  p.add_argument('--image-size', type=int, help='default: the model\'s native size')
  p.add_argument('--num-classes', type=int, help='default: 1000 at 224x224, else 10')
  p.add_argument('--depth', type=int, help='override the depth L of a CIFAR model')
  p.add_argument('--growth-rate', type=int, help='override the growth rate k')
  p.add_argument('--modes', default=','.join(MODES), help=f'comma-separated: {MODES}')
  p.add_argument('--implementations', default='shared',
                 help='comma-separated (JAX cases): shared, concat')
  p.add_argument('--dtypes', default=','.join(DTYPES), help=f'comma-separated: {DTYPES}')
  p.add_argument('--inputs', default='uint8', help=f'comma-separated (JAX cases): {INPUTS}')
  p.add_argument('--steps', type=int, default=5, help='timed steps per case; 0: compile only')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling')
  p.add_argument('--vs-torch', action='store_true', help='also time the step in PyTorch')
  p.add_argument('--torch-only', action='store_true',
                 help='only the PyTorch cases (--vs-torch without the JAX ones)')
  p.add_argument('--torch-runtimes', default=','.join(TORCH_RUNTIMES),
                 help=f'comma-separated: {TORCH_RUNTIMES}')
  p.add_argument('--xla-flags', default='', help='appended to XLA_FLAGS for the JAX cases')
  p.add_argument('--timeout', type=float, default=1800, help='seconds per case')
  p.add_argument('--residuals-by-depth', metavar='L,L,...',
                 help='also print the residual bytes of the model at these depths L (CIFAR '
                      'models), per mode and implementation, and per added dense layer')
  p.add_argument('--json', help='write the results here')
  p.add_argument('--report', nargs='+', metavar='JSON', help='print one table from JSON files')
  p.add_argument('--case', help=argparse.SUPPRESS)  # internal: run one case in this process
  args = p.parse_args(argv)
  if args.report or args.case:
    return args
  from densenet_jax import architectures  # plain data: no JAX, no TensorFlow
  if args.model not in architectures.NAMED:
    p.error(f'--model {args.model!r}: allowed models are {", ".join(architectures.NAMED)}')
  for name, allowed in (('modes', MODES), ('implementations', architectures.IMPLEMENTATIONS),
                        ('dtypes', DTYPES), ('inputs', INPUTS),
                        ('torch_runtimes', TORCH_RUNTIMES)):
    values = getattr(args, name).split(',')
    if not set(values) <= set(allowed):
      p.error(f'--{name.replace("_", "-")} {getattr(args, name)!r}: allowed values are '
              f'{", ".join(allowed)}')
    setattr(args, name, values)
  if args.batch_size < 1 or args.steps < 0 or args.warmup < 0:
    p.error('--batch-size must be >= 1, --steps and --warmup >= 0')
  args.image_size = (args.image_size
                     or architectures.NATIVE_IMAGE_SIZE[architectures.NAMED[args.model].stem])
  args.num_classes = args.num_classes or (1000 if args.image_size == 224 else 10)
  if args.residuals_by_depth:
    try:
      args.residuals_by_depth = [int(d) for d in args.residuals_by_depth.split(',')]
      for depth in args.residuals_by_depth:
        architectures.cifar_block_sizes(depth, architectures.NAMED[args.model].bottleneck)
    except ValueError as e:
      p.error(f'--residuals-by-depth {args.residuals_by_depth!r}: {e}')
  return args


# ---------------------------------------------------------------------------------------------
# One case, in a fresh process.

def peak_rss_reset():
  """Resets the kernel's peak-RSS mark (VmHWM) of this process; False where not allowed."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def _status_bytes(field):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field):
        return int(line.split()[1]) * 1024
  return None


def peak_rss_bytes():
  return _status_bytes('VmHWM:')


def rss_bytes():
  return _status_bytes('VmRSS:')


def tree_bytes(tree):
  import jax
  return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, 'nbytes'))


def time_steps(step, num_steps, warmup):
  """Wall and process CPU seconds of num_steps calls of step() (which waits), after warmup.

  CPU seconds (all threads) tell the work done where other processes share the cores.
  """
  for _ in range(warmup):
    step()
  wall, cpu = [], []
  for _ in range(num_steps):
    start, start_cpu = time.perf_counter(), time.process_time()
    step()
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return {'step_s_all': wall, 'cpu_s_all': cpu}


def create_model(spec, **overrides):
  from densenet_jax import models
  return models.create_model(spec['model'], num_classes=spec['num_classes'], depth=spec['depth'],
                             growth_rate=spec['growth_rate'],
                             memory_efficient=spec['mode'] == 'memory_efficient', **overrides)


def jax_case(spec):
  import functools

  import jax
  import jax.numpy as jnp

  from densenet_jax import costs, steps

  jax.config.update('jax_enable_compilation_cache', False)  # compile time is a figure here
  result = {'rss_imports_bytes': rss_bytes()}
  b, size = spec['batch_size'], spec['image_size']
  model = create_model(spec, dtype=spec['dtype'], implementation=spec['implementation'])
  lr = steps.learning_rate_schedule(0.1, 100, (50, 75))
  tx = steps.sgd_nesterov(lr, momentum=0.9, weight_decay=1e-4)
  state = steps.create_train_state(model, jax.random.key(0), (size, size, 3), tx)
  batch, transform = synthetic_batch(spec)
  result.update(rss_state_bytes=rss_bytes(), state_bytes=tree_bytes(state),
                batch_bytes=tree_bytes(batch))
  train_step = jax.jit(functools.partial(steps.train_step, learning_rate_fn=lr,
                                         transform=transform, axis_name=None),
                       donate_argnums=0,
                       compiler_options=steps.compiler_options(jax.default_backend()))
  start = time.perf_counter()
  lowered = train_step.lower(state, batch)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  result.update(lower_s=lowered_at - start, compile_s=time.perf_counter() - lowered_at,
                rss_compiled_bytes=rss_bytes())
  steps.release_freed_heap()  # as train.py does after compiling
  result.update(rss_released_bytes=rss_bytes(),
                residual_bytes=costs.saved_activation_bytes(model, size, b))
  analysis = compiled.memory_analysis()
  if analysis is not None:
    result['xla_temp_bytes'] = analysis.temp_size_in_bytes
  device = jax.devices()[0]
  on_cpu = device.platform == 'cpu'
  if on_cpu:
    peak_rss_reset()

  def step():
    nonlocal state
    state, metrics = jax.block_until_ready(compiled(state, batch))
    result['loss'] = float(metrics['loss'])
    if not bool(metrics['finite']):
      raise FloatingPointError('non-finite loss or gradient')

  result.update(time_steps(step, spec['steps'], spec['warmup'] if spec['steps'] else 0))
  if on_cpu and spec['steps']:
    result['peak_rss_bytes'] = peak_rss_bytes()
  elif spec['steps']:
    result['peak_bytes'] = (device.memory_stats() or {}).get('peak_bytes_in_use')
  result.update(device=device.device_kind, platform=device.platform, version=jax.__version__)
  return result


def synthetic_batch(spec):
  """(batch, DeviceTransform or None) of the case's input kind, made on the device."""
  import jax
  import jax.numpy as jnp

  from densenet_jax import augment
  from densenet_jax.datasets import CIFAR_PAD, SPECS

  b, size = spec['batch_size'], spec['image_size']
  labels = jax.random.randint(jax.random.key(2), (b,), 0, spec['num_classes'])
  if spec.get('input', 'float32') == 'float32':
    images = jax.random.normal(jax.random.key(1), (b, size, size, 3), jnp.float32)
    return {'image': images, 'label': labels}, None
  images = jax.random.randint(jax.random.key(1), (b, size, size, 3), 0, 256).astype(jnp.uint8)
  batch = {'image': images, 'label': labels, 'epoch': jnp.zeros(b, jnp.int32),
           'index': jnp.arange(b, dtype=jnp.int32)}
  if size >= 224:
    scale, mean, std = SPECS['imagenet2012'].normalization
    return batch, augment.DeviceTransform(scale, mean, std, photometric=True, flip=True)
  scale, mean, std = SPECS['cifar10'].normalization
  return batch, augment.DeviceTransform(scale, mean, std, translate=CIFAR_PAD, fill=mean,
                                        flip=True)


def torch_case(spec):
  import torch
  import torch.nn.functional as F

  import torch_densenet
  from densenet_jax import costs

  from densenet_jax import steps

  result = {'rss_imports_bytes': rss_bytes()}
  b, size = spec['batch_size'], spec['image_size']
  ours = create_model(spec)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  model = torch_densenet.build(ours).to(device, memory_format=torch.channels_last).train()
  num_params = sum(p.numel() for p in model.parameters())
  if num_params != costs.count_params(costs.init_shapes(ours, size)):
    raise AssertionError(f'the PyTorch twin has {num_params} parameters')
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                              weight_decay=1e-4)
  forward = torch.compile(model) if spec['runtime'] == 'compile' else model
  images = torch.randn(b, 3, size, size, device=device).to(memory_format=torch.channels_last)
  labels = torch.randint(0, spec['num_classes'], (b,), device=device)
  result.update(rss_state_bytes=rss_bytes(), residual_bytes=torch_saved_bytes(model, images))

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec['dtype'] == 'bfloat16'):
      loss = F.cross_entropy(forward(images), labels)
    loss.backward()
    optimizer.step()
    result['loss'] = float(loss)  # waits for the step

  start = time.perf_counter()
  step()
  result['first_step_s'] = time.perf_counter() - start
  result['rss_compiled_bytes'] = rss_bytes()
  steps.release_freed_heap()  # the same release as the JAX cases get
  result['rss_released_bytes'] = rss_bytes()
  if device.type == 'cpu':
    peak_rss_reset()
  else:
    torch.cuda.reset_peak_memory_stats()
  result.update(time_steps(step, spec['steps'], max(spec['warmup'] - 1, 0) if spec['steps'] else 0))
  if spec['runtime'] == 'compile' and result['step_s_all']:
    result['compile_s'] = result['first_step_s'] - statistics.median(result['step_s_all'])
  if device.type == 'cpu':
    result['peak_rss_bytes'] = peak_rss_bytes()
    result['device'], result['threads'] = platform.processor() or 'cpu', torch.get_num_threads()
  else:
    result['peak_bytes'] = torch.cuda.max_memory_allocated()
    result['device'] = torch.cuda.get_device_name()
  result.update(platform=device.type, version=torch.__version__)
  return result


def torch_saved_bytes(model, images):
  """Bytes of the distinct tensors autograd saves for the backward pass of one training forward
  pass (saved_tensors_hooks), less the parameters and the images: JAX's `residual_bytes`.
  Under torch.utils.checkpoint (memory_efficient) it sees what the checkpoints keep."""
  import torch

  saved = {}

  def pack(tensor):
    storage = tensor.untyped_storage()
    saved[storage.data_ptr()] = storage.nbytes()
    return tensor

  with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
    model(images).sum()
  model.zero_grad(set_to_none=True)
  excluded = {p.untyped_storage().data_ptr() for p in model.parameters()}
  excluded.add(images.untyped_storage().data_ptr())
  return sum(n for ptr, n in saved.items() if ptr not in excluded)


def run_case_here(spec):
  result = jax_case(spec) if spec['framework'] == 'jax' else torch_case(spec)
  if result['step_s_all']:
    result['step_s'] = statistics.median(result['step_s_all'])
    result['cpu_s'] = statistics.median(result['cpu_s_all'])
    result['images_per_s'] = spec['batch_size'] / result['step_s']
  return result


# ---------------------------------------------------------------------------------------------
# The driver: one subprocess per case, then the table.

def cases(args):
  jax_cases = [dict(framework='jax', mode=m, implementation=impl, dtype=d, input=i,
                    runtime='xla', xla_flags=args.xla_flags)
               for d in args.dtypes for m in args.modes for impl in args.implementations
               for i in args.inputs if not args.torch_only]
  torch_cases = []
  if args.vs_torch or args.torch_only:
    torch_cases = [dict(framework='torch', mode=m, dtype=d, input='float32', runtime=r)
                   for d in args.dtypes for m in args.modes for r in args.torch_runtimes]
  common = dict(model=args.model, batch_size=args.batch_size, image_size=args.image_size,
                num_classes=args.num_classes, depth=args.depth, growth_rate=args.growth_rate,
                steps=args.steps, warmup=args.warmup)
  return [dict(common, **case) for case in jax_cases + torch_cases]


def run_case(spec, timeout):
  """Runs one case in a fresh process; returns spec plus its figures or a failure status."""
  env = dict(os.environ)
  if spec['framework'] == 'torch':
    env['JAX_PLATFORMS'] = 'cpu'  # JAX only builds the model there: keep it off the GPU
  if spec.get('xla_flags'):
    env['XLA_FLAGS'] = ' '.join(filter(None, [env.get('XLA_FLAGS'), spec['xla_flags']]))
  command = [sys.executable, os.path.abspath(__file__), '--case', json.dumps(spec)]
  record = dict(spec, load_before=os.getloadavg()[0])
  start = time.perf_counter()
  try:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    record['status'] = f'timeout after {timeout:.0f} s'
    return record
  record.update(wall_s=time.perf_counter() - start, load_after=os.getloadavg()[0])
  lines = [line for line in done.stdout.splitlines() if line.startswith('RESULT ')]
  if done.returncode == 0 and lines:
    record.update(json.loads(lines[-1][len('RESULT '):]), status='ok')
  else:
    errors = (done.stderr.strip().splitlines() or ['no output'])
    record['status'] = f'failed ({done.returncode}): {errors[-1][:200]}'
  return record


def mib(value):
  return '' if value is None else f'{value / 2**20:,.1f}'


def table(records):
  """Markdown: one row per case; CIFAR models also get the paper's 300-epoch C10+ time."""
  cifar = any(r['image_size'] == 32 for r in records)
  head = ['framework', 'mode', 'dtype', 'input', 'runtime', 'step (ms)', 'best (ms)', 'CPU (s)',
          'images/s', 'compile (s)',
          'residuals (MiB)', 'XLA temp (MiB)', 'peak (MiB)'] + (['300 ep C10+ (h)'] if cifar
                                                                else []) + ['status']
  rows = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in records:
    ok = 'step_s' in r
    compile_s = (r.get('lower_s', 0) + r['compile_s']) if 'compile_s' in r else None
    mode = r['mode'] + (f' ({r["implementation"]})' if r.get('implementation') else '')
    cells = [r['framework'], mode, r['dtype'], r.get('input', 'float32'), r['runtime'],
             f'{1000 * r["step_s"]:,.1f}' if ok else '',
             f'{1000 * min(r["step_s_all"]):,.1f}' if ok else '',
             f'{r["cpu_s"]:,.2f}' if 'cpu_s' in r else '',
             f'{r["images_per_s"]:,.1f}' if ok else '',
             f'{compile_s:.1f}' if compile_s is not None else '', mib(r.get('residual_bytes')),
             mib(r.get('xla_temp_bytes')), mib(r.get('peak_bytes', r.get('peak_rss_bytes')))]
    if cifar:
      hours = CIFAR_EPOCHS * CIFAR_TRAIN_IMAGES / r['images_per_s'] / 3600 if ok else None
      cells.append(f'{hours:.2f}' if hours else '')
    rows.append('| ' + ' | '.join(cells + [r['status']]) + ' |')
  return '\n'.join(rows)


def accounting(records):
  """Markdown: where each case's resident memory goes (CPU), step by step of the case.

  imports: the runtime (Python, the framework, XLA or ATen); state: after building the
  parameters, optimizer state and batch (JAX's init compile included); compiled: after
  compiling (torch: after the first step); released: after steps.release_freed_heap; the rest:
  peak - released - XLA temporaries (what the steps hold beyond the compiled temporaries).
  """
  head = ['framework', 'mode', 'imports', 'state', 'compiled', 'released', 'params + opt',
          'residuals', 'XLA temp', 'peak', 'the rest']
  rows = ['| ' + ' | '.join(head) + ' (MiB) |', '|' + '---|' * len(head)]
  for r in records:
    if 'rss_imports_bytes' not in r:
      continue
    peak = r.get('peak_rss_bytes')
    rest = (peak - r['rss_released_bytes'] - r.get('xla_temp_bytes', 0)
            if peak and r.get('rss_released_bytes') else None)
    mode = r['mode'] + (f' ({r["implementation"]})' if r.get('implementation') else '')
    rows.append('| ' + ' | '.join([r['framework'], mode] + [mib(r.get(k)) for k in (
        'rss_imports_bytes', 'rss_state_bytes', 'rss_compiled_bytes', 'rss_released_bytes',
        'state_bytes', 'residual_bytes', 'xla_temp_bytes')] + [mib(peak), mib(rest)]) + ' |')
  return '\n'.join(rows)


def ratios(records):
  """images/s of each JAX case over the PyTorch case with the same model, batch, mode, dtype."""
  def key(r):
    return model_key(r) + (r['mode'], r['dtype'])

  theirs = [r for r in records if r['framework'] == 'torch' and 'step_s' in r]
  lines = []
  for r in records:
    if r['framework'] != 'jax' or 'step_s' not in r:
      continue
    for t in theirs:
      if key(t) == key(r):
        lines.append(f'- {r["model"]} b{r["batch_size"]} {r["mode"]} {r["dtype"]} '
                     f'{r.get("input", "float32")} input: JAX / torch {t["runtime"]} = '
                     f'{r["images_per_s"] / t["images_per_s"]:.2f}x')
  return '\n'.join(lines)


def residuals_by_depth(args):
  """Markdown: residual bytes at each depth (JAX: read off the traced step, every mode and
  implementation; torch: its saved tensors, where torch imports), and per added dense layer."""
  columns = [('jax', m, impl) for m in args.modes for impl in args.implementations]
  try:
    import torch
    import torch_densenet
    columns += [('torch', m, None) for m in args.modes]
  except ImportError:
    torch = None
  from densenet_jax import architectures, costs
  rows = {}
  for depth in args.residuals_by_depth:
    spec = dict(model=args.model, num_classes=args.num_classes, depth=depth,
                growth_rate=args.growth_rate)
    for framework, mode, impl in columns:
      model = create_model(dict(spec, mode=mode), implementation=impl or 'shared')
      if framework == 'jax':
        value = costs.saved_activation_bytes(model, args.image_size, args.batch_size)
      else:
        twin = torch_densenet.build(model).to(memory_format=torch.channels_last).train()
        images = torch.randn(args.batch_size, 3, args.image_size, args.image_size).to(
            memory_format=torch.channels_last)
        value = torch_saved_bytes(twin, images)
      rows.setdefault(depth, []).append(value)
  layers = {d: sum(architectures.cifar_block_sizes(
      d, architectures.NAMED[args.model].bottleneck)) for d in rows}
  names = [f'{f} {m}' + (f' ({i})' if i else '') for f, m, i in columns]
  out = ['| depth L | dense layers | ' + ' | '.join(names) + ' (MiB) |',
         '|' + '---|' * (len(names) + 2)]
  depths = list(rows)
  for d in depths:
    out.append(f'| {d} | {layers[d]} | ' + ' | '.join(mib(v) for v in rows[d]) + ' |')
  for a, b in zip(depths, depths[1:]):
    slopes = [(vb - va) / (layers[b] - layers[a]) for va, vb in zip(rows[a], rows[b])]
    out.append(f'| per layer, {a} -> {b} | | ' + ' | '.join(mib(s) for s in slopes) + ' |')
  return '\n'.join(out)


def model_key(r):
  return r['model'], r.get('depth'), r.get('growth_rate'), r['batch_size'], r['image_size']


def report(records):
  out = []
  for key in dict.fromkeys(model_key(r) for r in records):
    name, depth, growth_rate, b, size = key
    group = [r for r in records if model_key(r) == key]
    device = next((r['device'] for r in group if r.get('device')), '?')
    name += f' L={depth}' if depth else ''
    name += f' k={growth_rate}' if growth_rate else ''
    out.append(f'### {name}, batch {b}, {size}x{size} ({device})\n\n{table(group)}\n')
    if any(r.get('platform') == 'cpu' for r in group):
      out.append(f'Resident memory (CPU), as each case goes:\n\n{accounting(group)}\n')
  lines = ratios(records)
  if lines:
    out.append('our/their images/s:\n' + lines + '\n')
  return '\n'.join(out)


def main(argv=None):
  args = parse_args(argv)
  if args.case:
    print('RESULT ' + json.dumps(run_case_here(json.loads(args.case))), flush=True)
    return
  sources = []
  if args.report:
    records = []
    for path in args.report:
      with open(path) as f:
        data = json.load(f)
      records += data['results']
      sources.append(data['meta'])
  else:
    todo = cases(args)
    if args.vs_torch or args.torch_only:
      try:
        import torch  # noqa: F401  (only checks that the PyTorch cases can run)
      except ImportError:
        print('torch is not importable here: --vs-torch cases skipped', file=sys.stderr)
        todo = [c for c in todo if c['framework'] == 'jax']
    records = []
    for spec in todo:
      print(f'running {spec["framework"]} {spec["mode"]} {spec["dtype"]} {spec["runtime"]} ...',
            file=sys.stderr, flush=True)
      records.append(run_case(spec, args.timeout))
      print(f'  {records[-1]["status"]}', file=sys.stderr, flush=True)
  print(report(records))
  if not args.report and args.residuals_by_depth:
    print(f'Residuals by depth, batch {args.batch_size}:\n\n{residuals_by_depth(args)}\n')
  if args.json:
    meta = dict(date=datetime.datetime.now().isoformat(timespec='seconds'),
                host=platform.node(), cpus=os.cpu_count(), python=platform.python_version(),
                command=' '.join([os.path.basename(sys.executable)] + sys.argv))
    with open(args.json, 'w') as f:
      json.dump({'meta': meta, 'results': records, 'sources': sources}, f, indent=1)


if __name__ == '__main__':
  main()
