r"""Input-pipeline throughput: what one CPU core delivers at the recipe's
sizes, beside what a GPU step consumes.

  python -m benchmarks.input_pipeline_throughput [--images 8]
      [--step_seconds 0.1] [--eval_step_seconds 0.035]

needs no dataset: it encodes synthetic records of the real datasets' sizes
and format (PNG image and label, serialised with the builders' TFDS
features and decoded as `tfds.data_source` decodes them) and times, in one
thread, decode + the recipe's transforms (`loaders.transforms_of`) of
each stream:

  warm-up source   GTA5 1914x1052 resized to 1280x720, colour jitter
  warm-up target   Cityscapes 2048x1024 resized to 1024x512
  self-training    2048x1024 scaled 0.5-1.5, crop 512x1024, flip, jitter
  evaluation       2048x1024 resized to 1024x512, label kept at 2048x1024

in images/s per CPU core (thread CPU time, so other load on the machine
hardly matters), the colour-jittered streams once per jitter implementation
(`transforms.COLOR_JITTERS`: the float HSV one the demo keeps and the
released PIL one, the recipes' `data.color_jitter_implementation`), beside the images/s a GPU step consumes (4 + 4 images per warm-up /
SPCL step, 8 per self-training step, 8 per evaluation batch, over the
assumed step times; measure them with `benchmarks.step_vs_pytorch`), their
ratio and the cores needed to deliver 2x the step's consumption. It also
prints the two jitter implementations' time per image side by side, and the
evaluation pass's wall-clock rate read by 0 and by N threads
(`eval_batches(threads=...)`).

With `--data_dir`, it reads a built dataset instead, as before: the rate for
0, 1 and 2 grain worker processes, side by side, with the warm-up
(`--mode warmup`: resize + colour jitter) or self-training transforms
(`--mode self_training`: random scale 0.5-1.5, crop, flip, colour jitter):

  python -m benchmarks.input_pipeline_throughput --data_dir /tmp/tfds \
      --dataset sim2real_demo/default --split source_train

With `--memory`, the host memory of the recipe's training streams over
GTA5 and Cityscapes built at their real sizes (`--data_dir`, or
`--fake_data_root=DIR` to make fake downloads there and build them):
images/s and the peak RSS per grain worker and of the loader with its
workers, with grain's default read-ahead and with the config's
(`data.read_threads`, `data.read_ahead`), and what a worker holds before it
reads (its imports):

  python -m benchmarks.input_pipeline_throughput --memory \
      --fake_data_root=/tmp/recipe_fake [--memory_workers=4]
"""

import dataclasses
import os
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from spcl_jax.data import global_batches
from spcl_jax.data import loaders
from spcl_jax.data import transforms
from spcl_jax.infra import process_tree

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data directory (a '
                                'built dataset); without: synthetic records '
                                'at the recipe sizes')
_DATASET = flags.DEFINE_string('dataset', 'sim2real_demo/default', 'dataset')
_SPLIT = flags.DEFINE_string('split', 'source_train', 'split')
_SIZE = flags.DEFINE_list('size', ['128', '256'], 'resize to height,width')
_CROP = flags.DEFINE_list('crop', ['128', '256'], 'self_training crop')
_MODE = flags.DEFINE_enum('mode', 'warmup', ['warmup', 'self_training'],
                          'which transforms')
_BATCH = flags.DEFINE_integer('batch', 8, 'batch size')
_BATCHES = flags.DEFINE_integer('batches', 30, 'timed batches')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'], 'worker counts')
_IMAGES = flags.DEFINE_integer('images', 8, 'synthetic: timed images per '
                               'stream')
_STEP_SECONDS = flags.DEFINE_float('step_seconds', 0.1, 'synthetic: seconds '
                                   'of a GPU training step (assumed)')
_EVAL_IMAGES = flags.DEFINE_integer(
    'eval_images', 32, 'synthetic: images of the timed evaluation passes')
_MEMORY = flags.DEFINE_bool(
    'memory', False, 'host memory of the training loaders at the recipe '
    'sizes (needs --data_dir with gta5 and spcl_cityscapes built, or '
    '--fake_data_root to make them)')
_FAKE_ROOT = flags.DEFINE_string(
    'fake_data_root', None, '--memory: make fake GTA5 / Cityscapes '
    'downloads at their real sizes here and build them (data_prep.'
    'fake_downloads), unless already there')
_MEMORY_WORKERS = flags.DEFINE_integer('memory_workers', 4, '--memory: '
                                       'grain workers per stream (recipe: 4)')
_MEMORY_BATCHES = flags.DEFINE_integer('memory_batches', 12, '--memory: '
                                       'batches read per stream and setting')
_EVAL_STEP_SECONDS = flags.DEFINE_float(
    'eval_step_seconds', 0.035, 'synthetic: seconds of a GPU evaluation '
    'batch of 8 (forward only; assumed)')

JITTER = (0.5, 0.5, 0.5, 0.2)
GTA5_SIZE, CITYSCAPES_SIZE = (1052, 1914), (1024, 2048)   # (height, width)


@dataclasses.dataclass(frozen=True)
class Stream:
  """One input stream of the recipe: what it reads, how it transforms it,
  how many images a GPU step takes of it."""
  name: str
  record_size: tuple         # (height, width) of the stored records
  spec: dict                 # PipelineSpec fields of its transforms
  images_per_step: int
  evaluation: bool = False   # consumed by an evaluation batch


STREAMS = (
    Stream('warm-up source 1914x1052 -> 1280x720, jitter', GTA5_SIZE,
           dict(size=(720, 1280), color_jitter=JITTER), 4),
    Stream('warm-up target 2048x1024 -> 1024x512', CITYSCAPES_SIZE,
           dict(size=(512, 1024)), 4),
    Stream('self-training 2048x1024, scale, crop 512x1024, flip, jitter',
           CITYSCAPES_SIZE,
           dict(scale_range=(0.5, 1.5), crop=(512, 1024), flip=True,
                color_jitter=JITTER), 8),
    Stream('evaluation 2048x1024 -> 1024x512', CITYSCAPES_SIZE,
           dict(size=(512, 1024), resize_label=False), 8, evaluation=True),
)


# ------------------------------------------------------- synthetic data ---

def synthetic_label(rng: np.random.Generator, size) -> np.ndarray:
  """A street-like uint8 trainId map of `size`: 19-class blocks of a coarse
  grid (nearest-upsampled) with a sprinkle of ignored pixels."""
  height, width = size
  coarse = rng.integers(0, 19, (height // 32 + 1, width // 32 + 1))
  label = np.kron(coarse, np.ones((32, 32), np.int64))[:height, :width]
  label[rng.random((height, width)) < 0.01] = 255
  return label.astype(np.uint8)


def synthetic_image(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
  """A photo-like uint8 RGB image of the label's size: a smooth colour
  field, a colour per class region, sensor noise (so that PNG compresses it
  about as much as a real frame)."""
  height, width = label.shape
  field = Image.fromarray(rng.integers(0, 256, (9, 16, 3), dtype=np.uint8))
  field = np.asarray(field.resize((width, height), Image.BICUBIC), np.float32)
  colours = rng.integers(0, 256, (256, 3)).astype(np.float32)
  image = 0.6 * field + 0.4 * colours[label]
  image += rng.normal(0, 4, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


class SyntheticSource:
  """A random-access source of `count` serialised records (the builders'
  TFDS features: PNG image and label), cycling over `distinct` encoded
  ones; `[i]` decodes as `tfds.data_source` does."""

  def __init__(self, size, count: int, distinct: int = 3, seed: int = 0):
    from data_prep import records  # pylint: disable=g-import-not-at-top
    self.features = records.record_features()
    rng = np.random.default_rng(seed)
    self.serialized = []
    for i in range(distinct):
      label = synthetic_label(rng, size)
      self.serialized.append(self.features.serialize_example({
          'image': synthetic_image(rng, label), 'label': label[..., None],
          'image_id': f'synthetic_{i:06d}'}))
    self.count = count

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, index: int) -> dict:
    return self.features.deserialize_example_np(
        self.serialized[index % len(self.serialized)])

  def megabytes(self) -> float:
    return np.mean([len(s) for s in self.serialized]) / 1e6


# ---------------------------------------------------------------- timing --

def with_jitter(ops: list, implementation: str) -> list:
  """`ops` with every ColorJitter using `implementation`."""
  return [dataclasses.replace(op, implementation=implementation)
          if isinstance(op, transforms.ColorJitter) else op for op in ops]


def apply(ops: list, element: dict, seed: int) -> dict:
  """The grain transforms `ops` applied to one element, in this thread."""
  rng = np.random.default_rng(seed)
  for op in ops:
    element = (op.random_map(element, rng) if hasattr(op, 'random_map')
               else op.map(element))
  return element


def per_core_rate(source, ops: list, images: int) -> float:
  """Images/s of decode + `ops` on one core (this thread's CPU time)."""
  apply(ops, source[0], 0)   # warm-up: imports, first allocations
  start = time.thread_time()
  for i in range(images):
    apply(ops, source[i], i)
  return images / (time.thread_time() - start)


def jitter_milliseconds(implementation: str, size, repeats: int = 5) -> float:
  """Median CPU ms of one colour jitter of a synthetic image of `size`."""
  rng = np.random.default_rng(0)
  image = synthetic_image(rng, synthetic_label(rng, size))
  jitter = transforms.COLOR_JITTERS[implementation]
  times = []
  for seed in range(repeats + 1):
    start = time.thread_time()
    jitter(image, np.random.default_rng(seed), *JITTER)
    times.append(time.thread_time() - start)
  return 1e3 * float(np.median(times[1:]))


def eval_pass_rate(source, spec: loaders.PipelineSpec, threads: int) -> float:
  """Wall-clock images/s of one `eval_batches` pass over `source`."""
  start = time.perf_counter()
  for _ in loaders.eval_batches(spec, source, 0, 1, threads=threads):
    pass
  return len(source) / (time.perf_counter() - start)


# ----------------------------------------------------------------- modes --

def recipe_mode() -> None:
  """Synthetic records at the recipe sizes: per-core rates beside the GPU
  step's consumption."""
  images, cores = _IMAGES.value, os.cpu_count() or 1
  print(f'Input pipeline at the recipe sizes: synthetic PNG records, '
        f'{images} images per stream, one thread (CPU time); this machine '
        f'has {cores} CPU cores.\nGPU consumption assumed: a training step '
        f'of {_STEP_SECONDS.value} s, an evaluation batch of 8 in '
        f'{_EVAL_STEP_SECONDS.value} s (--step_seconds, '
        f'--eval_step_seconds; measure them with benchmarks.step_vs_pytorch)'
        '.\n')
  print('colour jitter (0.5, 0.5, 0.5, 0.2), ms per image (CPU):')
  print(f'  {"size":>10} ' + ' '.join(f'{name:>9}' for name in
                                      transforms.COLOR_JITTERS) + '    speed-up')
  for size in ((720, 1280), CITYSCAPES_SIZE):
    ms = {name: jitter_milliseconds(name, size) for name in transforms.COLOR_JITTERS}
    print(f'  {size[1]:>5}x{size[0]:<4} ' + ' '.join(
        f'{v:9.1f}' for v in ms.values()) +
          f'    x{ms["float"] / ms["released"]:.1f}')

  sources, eval_source = {}, None
  header = (f'\n{"stream":<70} {"images/s/core":>13} {"GPU consumes":>12} '
            f'{"core/GPU":>8} {"cores for 2x":>12}')
  print(header)
  for stream in STREAMS:
    if stream.record_size not in sources:
      sources[stream.record_size] = SyntheticSource(stream.record_size,
                                                    images)
    source = sources[stream.record_size]
    spec = loaders.PipelineSpec('synthetic', 'train', '', 8, **stream.spec)
    ops = loaders.transforms_of(spec)
    consumed = stream.images_per_step / (
        _EVAL_STEP_SECONDS.value if stream.evaluation
        else _STEP_SECONDS.value)
    variants = (transforms.COLOR_JITTERS if stream.spec.get('color_jitter')
                else ('',))
    for implementation in variants:
      rate = per_core_rate(source, with_jitter(ops, implementation or
                                               'float'), images)
      name = stream.name + (f' [{implementation}]' if implementation
                            else '')
      print(f'{name:<70} {rate:13.2f} {consumed:12.1f} '
            f'{rate / consumed:8.3f} {2 * consumed / rate:12.1f}')
    if stream.evaluation:
      eval_source, eval_spec = source, spec
  print('(record sizes: ' + ', '.join(
      f'{w}x{h} {s.megabytes():.1f} MB' for (h, w), s in sources.items()) +
        '; a warm-up / SPCL step takes both warm-up streams, so it needs '
        'the sum of their cores)')

  eval_source.count = _EVAL_IMAGES.value
  threads = sorted({0, 1, 2, cores})
  rates = [eval_pass_rate(eval_source, eval_spec, t) for t in threads]
  print(f'\nevaluation pass (eval_batches, batch 8, {eval_source.count} '
        f'images), wall clock on {cores} cores shared with whatever else '
        'runs:')
  for t, rate in zip(threads, rates):
    print(f'  threads={t}: {rate:8.2f} images/s   x{rate / rates[0]:.2f}')


def dataset_mode() -> None:
  """A built dataset through grain's loader, for each worker count."""
  size = tuple(int(v) for v in _SIZE.value)
  results = []
  for workers in (int(w) for w in _WORKERS.value):
    kw = dict(size=size, color_jitter=JITTER)
    if _MODE.value == 'self_training':
      kw = dict(size=None, color_jitter=JITTER, scale_range=(0.5, 1.5),
                crop=tuple(int(v) for v in _CROP.value), flip=True)
    spec = loaders.PipelineSpec(_DATASET.value, _SPLIT.value, _DATA_DIR.value,
                                _BATCH.value, worker_count=workers, **kw)
    iterator = iter(loaders.train_loader(spec))
    for _ in range(3):  # start-up of the workers is not throughput
      next(iterator)
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
      next(iterator)
    elapsed = time.perf_counter() - start
    results.append((workers, _BATCHES.value * _BATCH.value / elapsed))
    del iterator
  base = results[0][1]
  print(f'{_DATASET.value}:{_SPLIT.value} mode={_MODE.value} size={size} '
        f'batch={_BATCH.value}')
  for workers, rate in results:
    print(f'  workers={workers}: {rate:8.1f} images/s   x{rate / base:.2f}')


# ---------------------------------------------------------- host memory --

# The recipe's training streams at their sizes, one host's global batch:
# (name, dataset, PipelineSpec fields, batch)
MEMORY_STREAMS = (
    ('warm-up source 1914x1052 -> 1280x720, jitter', 'gta5',
     dict(size=(720, 1280), color_jitter=JITTER), 4),
    ('warm-up target 2048x1024 -> 1024x512', 'spcl_cityscapes',
     dict(size=(512, 1024)), 4),
    ('self-training 2048x1024, scale, crop 512x1024, flip, jitter',
     'spcl_cityscapes', dict(scale_range=(0.5, 1.5), crop=(512, 1024),
                             flip=True, color_jitter=JITTER), 8),
)


def _workers() -> list[int]:
  """This process's grain worker processes (multiprocessing spawn)."""
  return [pid for pid in process_tree.children(os.getpid())
          if b'spawn_main' in process_tree.command_line(pid)]


def _imports_rss(queue) -> None:   # in a spawned process
  from spcl_jax.data import loaders as worker_loaders  # pylint: disable=g-import-not-at-top,reimported
  del worker_loaders
  import resource  # pylint: disable=g-import-not-at-top
  queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def worker_imports_rss() -> int:
  """Peak RSS of a spawned process that imports what a worker imports
  before it reads (this module as `__mp_main__`, the pipeline's modules)."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  context = multiprocessing.get_context('spawn')
  queue = context.Queue()
  process = context.Process(target=_imports_rss, args=(queue,))
  process.start()
  rss = queue.get(timeout=300)
  process.join()
  return rss


def stream_memory(spec: loaders.PipelineSpec, batches: int) -> dict:
  """images/s and the peak RSS of each worker and of the whole tree while
  `batches` batches of a training loader are read."""
  import threading  # pylint: disable=g-import-not-at-top
  peaks, stop = {'worker': 0, 'total': 0}, threading.Event()

  def sample():
    while not stop.is_set():
      workers = [process_tree.rss(pid) for pid in _workers()]
      peaks['worker'] = max([peaks['worker'], *workers])
      peaks['total'] = max(peaks['total'],
                         process_tree.rss(os.getpid()) + sum(workers))
      stop.wait(0.2)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  # GlobalBatchIterator.close() stops the workers (grain's iterator has no
  # close()); the batches stay on the host (no mesh)
  iterator = global_batches.GlobalBatchIterator(loaders.train_loader(spec),
                                                mesh=None)
  local = iterator.local_iterator
  read = lambda: global_batches.copy_out_of_shared_memory(next(local))
  read()   # the workers' start-up is not throughput
  start = time.perf_counter()
  for _ in range(batches):
    read()
  seconds = time.perf_counter() - start
  iterator.close()
  stop.set()
  sampler.join()
  return {'rate': batches * spec.global_batch_size / seconds, **peaks}


def memory_mode() -> None:
  """The recipe's training streams over a built dataset at the real sizes,
  with grain's default read-ahead and with the config's (`data.read_threads`,
  `data.read_ahead`): images/s and the peak RSS per worker and in total."""
  from configs import default as default_config  # pylint: disable=g-import-not-at-top
  data_dir = _DATA_DIR.value
  if _FAKE_ROOT.value:
    from data_prep import fake_downloads  # pylint: disable=g-import-not-at-top
    data_dir = fake_downloads.built_fake_recipe_data(_FAKE_ROOT.value)
  data = default_config.get_config().data
  settings = {'grain default (16 threads, 500 ahead)': (16, 500),
              f'config default ({data.read_threads} threads, '
              f'{data.read_ahead} ahead)': (data.read_threads,
                                            data.read_ahead)}
  gib = 2 ** 30
  print(f'Training loaders at the recipe sizes ({data_dir}): '
        f'{_MEMORY_WORKERS.value} grain workers per stream, '
        f'{_MEMORY_BATCHES.value} batches read, on {os.cpu_count()} cores.\n'
        f'A worker before it reads (imports): '
        f'{worker_imports_rss() / gib:.2f} GiB\n')
  print('| stream | setting | images/s | peak RSS per worker | '
        'peak RSS, loader + workers |\n|---|---|---:|---:|---:|')
  for name, dataset, fields, batch in MEMORY_STREAMS:
    for setting, (threads, ahead) in settings.items():
      spec = loaders.PipelineSpec(
          dataset, 'train', data_dir, batch,
          worker_count=_MEMORY_WORKERS.value, read_threads=threads,
          read_ahead=ahead, color_jitter_implementation='released',
          **fields)
      result = stream_memory(spec, _MEMORY_BATCHES.value)
      print(f'| {name} | {setting} | {result["rate"]:.1f} | '
            f'{result["worker"] / gib:.2f} GiB | '
            f'{result["total"] / gib:.2f} GiB |', flush=True)


def main(argv):
  del argv
  if _MEMORY.value:
    memory_mode()
  elif _DATA_DIR.value:
    dataset_mode()
  else:
    recipe_mode()


if __name__ == '__main__':
  app.run(main)
