r"""Input-pipeline throughput (images/s) for 0, 1 and 2 grain workers, side
by side in one run, with the recipe's training transforms.

  python -m benchmarks.input_pipeline_throughput --data_dir /tmp/tfds \
      --dataset sim2real_demo/default --split source_train

Builds nothing: build the dataset first (`python -m data_prep.build ...`).
`--mode warmup` uses the warm-up / SPCL source transforms (resize + colour
jitter), `--mode self_training` the self-training ones (random scale 0.5-1.5,
crop, flip, colour jitter).
"""

import time

from absl import app
from absl import flags

from spcl_jax import input_pipeline as ip

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data directory')
_DATASET = flags.DEFINE_string('dataset', 'sim2real_demo/default', 'dataset')
_SPLIT = flags.DEFINE_string('split', 'source_train', 'split')
_SIZE = flags.DEFINE_list('size', ['128', '256'], 'resize to height,width')
_CROP = flags.DEFINE_list('crop', ['128', '256'], 'self_training crop')
_MODE = flags.DEFINE_enum('mode', 'warmup', ['warmup', 'self_training'],
                          'which transforms')
_BATCH = flags.DEFINE_integer('batch', 8, 'batch size')
_BATCHES = flags.DEFINE_integer('batches', 30, 'timed batches')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'], 'worker counts')


def main(argv):
  del argv
  size = tuple(int(v) for v in _SIZE.value)
  results = []
  for workers in (int(w) for w in _WORKERS.value):
    kw = dict(size=size, color_jitter=(0.5, 0.5, 0.5, 0.2))
    if _MODE.value == 'self_training':
      kw = dict(size=None, color_jitter=(0.5, 0.5, 0.5, 0.2),
                scale_range=(0.5, 1.5),
                crop=tuple(int(v) for v in _CROP.value), flip=True)
    spec = ip.PipelineSpec(_DATASET.value, _SPLIT.value, _DATA_DIR.value,
                           _BATCH.value, worker_count=workers, **kw)
    iterator = iter(ip.train_loader(spec))
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


if __name__ == '__main__':
  flags.mark_flags_as_required(['data_dir'])
  app.run(main)
