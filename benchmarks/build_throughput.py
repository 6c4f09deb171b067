r"""Dataset build throughput (images/s) on fake GTA5 data of the real size.

  python -m benchmarks.build_throughput --num_pairs 60

Writes `num_pairs` random 1280x720 GTA5-layout pairs (palette labels) to a
temporary directory, builds them with the `gta5` builder, and prints the
build's images/s next to the time spent writing the fakes.
"""

import os
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from data_prep import builders

_NUM_PAIRS = flags.DEFINE_integer('num_pairs', 60, 'fake pairs to build')
_SIZE = flags.DEFINE_list('size', ['720', '1280'], 'height,width')


def write_fakes(root: str, count: int, height: int, width: int) -> None:
  rng = np.random.RandomState(0)
  os.makedirs(os.path.join(root, 'images'))
  os.makedirs(os.path.join(root, 'labels'))
  for i in range(1, count + 1):
    # smooth-ish content so that PNG sizes resemble real frames
    small = rng.randint(0, 256, (height // 16, width // 16, 3), np.uint8)
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(
        os.path.join(root, 'images', f'{i:05d}.png'))
    ids = np.kron(rng.randint(0, 34, (height // 40, width // 40)),
                  np.ones((40, 40), np.uint8)).astype(np.uint8)
    label = Image.fromarray(ids, mode='P')
    label.putpalette(list(rng.randint(0, 256, 768)))
    label.save(os.path.join(root, 'labels', f'{i:05d}.png'))


def main(argv):
  del argv
  height, width = (int(v) for v in _SIZE.value)
  with tempfile.TemporaryDirectory() as tmp:
    manual = os.path.join(tmp, 'manual')
    start = time.perf_counter()
    write_fakes(manual, _NUM_PAIRS.value, height, width)
    written = time.perf_counter() - start
    start = time.perf_counter()
    builders.build('gta5', os.path.join(tmp, 'out'), manual_dir=manual)
    built = time.perf_counter() - start
  print(f'gta5 fakes {height}x{width}, {_NUM_PAIRS.value} pairs, '
        f'{os.cpu_count()} cores')
  print(f'  writing fakes: {_NUM_PAIRS.value / written:7.1f} pairs/s')
  print(f'  build:         {_NUM_PAIRS.value / built:7.1f} images/s '
        f'({built:.1f} s)')


if __name__ == '__main__':
  app.run(main)
