r"""Builds a dataset into ArrayRecord shards readable with `tfds.data_source`.

  python -m data_prep.build --dataset sim2real_demo --data_dir OUT
  python -m data_prep.build --dataset sim2real_demo --config tiny --data_dir OUT
  python -m data_prep.build --dataset sim2real_demo --data_dir OUT \
      --demo_counts 400,200,100 --demo_size 128,256
  python -m data_prep.build --dataset acdc/fog --manual_dir DIR --data_dir OUT
  python -m data_prep.build --dataset folder --name NAME --manual_dir DIR \
      --data_dir OUT [--label_map MAP.json] [--label_suffix _labelIds]

Afterwards: `tfds.data_source("sim2real_demo/default", split="source_train",
data_dir=OUT)`. TFDS writes into a temporary directory renamed when complete,
so an interrupted build leaves nothing a reader would accept.
"""

from absl import app
from absl import flags
from absl import logging

from data_prep import builders
from data_prep import sim2real_demo
from spcl_jax.data import sources
from spcl_jax.infra import storage

_DATASET = flags.DEFINE_string(
    'dataset', None, f'one of {", ".join(sorted(builders.DATASETS))} '
    '(NAME/CONFIG chooses a config, e.g. acdc/fog), or folder (with --name)')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'output directory')
_MANUAL_DIR = flags.DEFINE_string('manual_dir', None,
                                  'extracted download (real datasets)')
_CONFIG = flags.DEFINE_string('config', None, 'builder config name '
                              '(sim2real_demo: default or tiny)')
_DEMO_COUNTS = flags.DEFINE_list('demo_counts', None, 'sim2real_demo: images '
                                 'in source_train,target_train,target_val')
_DEMO_SIZE = flags.DEFINE_list('demo_size', None, 'sim2real_demo: height,width')
_DEMO_SEED = flags.DEFINE_integer('demo_seed', None, 'sim2real_demo: seed')
_NAME = flags.DEFINE_string('name', None, 'folder: the dataset\'s name (what '
                            'data.source / data.target read)')
_LABEL_MAP = flags.DEFINE_string(
    'label_map', None, 'folder: JSON file mapping label ids ({"ids": {...}}) '
    'or colours ({"colors": {"R,G,B": trainId}}) to trainIds (default: '
    'Cityscapes label ids)')
_IMAGE_SUFFIX = flags.DEFINE_string(
    'image_suffix', '', 'folder: dropped from image stems before pairing')
_LABEL_SUFFIX = flags.DEFINE_string(
    'label_suffix', '_labelIds', 'folder: dropped from label stems before '
    'pairing (a label stem without it is used as it is)')
_SKIP_CORRUPT = flags.DEFINE_bool(
    'skip_corrupt', False, 'skip (and record) unreadable files instead of '
    'failing the build')


def _ints(name, values, count):
  try:
    numbers = tuple(int(v) for v in values)
  except ValueError:
    numbers = ()
  if len(numbers) != count:
    raise app.UsageError(f'--{name} expects {count} comma-separated integers, '
                         f'got {",".join(values)!r}')
  return numbers


def demo_config_from_flags():
  """A sim2real_demo config from --config / --demo_* (None: the default)."""
  if not (_DEMO_COUNTS.value or _DEMO_SIZE.value or _DEMO_SEED.value
          is not None):
    return _CONFIG.value
  base = next(c for c in sim2real_demo.Sim2RealDemo.BUILDER_CONFIGS
              if c.name == (_CONFIG.value or 'default'))
  counts = (_ints('demo_counts', _DEMO_COUNTS.value, 3) if _DEMO_COUNTS.value
            else tuple(base.counts.values()))
  height, width = (_ints('demo_size', _DEMO_SIZE.value, 2) if _DEMO_SIZE.value
                   else (base.height, base.width))
  seed = base.seed if _DEMO_SEED.value is None else _DEMO_SEED.value
  return sim2real_demo.make_config(height=height, width=width, counts=counts,
                                   seed=seed)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = (demo_config_from_flags() if _DATASET.value == 'sim2real_demo'
            else _CONFIG.value)
  folder_options = {}
  if _DATASET.value == builders.FOLDER:
    if not _NAME.value:
      raise app.UsageError('--dataset folder needs --name NAME (what '
                           'data.source / data.target will read)')
    folder_options = {'name': _NAME.value, 'label_map': _LABEL_MAP.value,
                      'image_suffix': _IMAGE_SUFFIX.value,
                      'label_suffix': _LABEL_SUFFIX.value}
  elif _NAME.value or _LABEL_MAP.value:
    raise app.UsageError('--name and --label_map are for --dataset folder')
  if storage.is_remote(_DATA_DIR.value):   # not a local folder `gs:`
    name = _NAME.value or _DATASET.value.partition('/')[0]
    raise app.UsageError(
        f'--data_dir={_DATA_DIR.value}: a build writes local files only '
        '(ArrayRecord); build into a local --data_dir and copy it up: '
        f'{sources.copy_up_command(name, _DATA_DIR.value)}')
  builder = builders.build(_DATASET.value, _DATA_DIR.value, config,
                           _MANUAL_DIR.value, _SKIP_CORRUPT.value,
                           **folder_options)
  logging.info('built %s into %s', builder.info.full_name, builder.data_dir)
  print(f'{builder.info.full_name}: {builder.data_dir}')
  for name, split in builder.info.splits.items():
    unlabelled = (builder.info.metadata or {}).get(name, {}).get(
        'has_labels') is False
    print(f'  {name}: {split.num_examples} examples'
          + (' (no labels: not for evaluation)' if unlabelled else ''))


if __name__ == '__main__':
  flags.mark_flags_as_required(['dataset', 'data_dir'])
  app.run(main)
