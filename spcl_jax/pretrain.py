"""Pretrains the demo's backbone on object-centric classification, the
demo's stand-in for ImageNet initialisation (`data_prep/pretrain_render.py`
says what the task is and why it is an honest analogue).

  python -m spcl_jax.pretrain --config=configs/demo_pretrain.py --output=DIR

renders the images (in memory, seeded apart from the demo splits), trains the
backbone of `config.model` with a global-average-pooled linear classifier,
and writes the backbone to DIR in the layout of `data_prep.port_torchvision`
(`metadata.json` + `weights/`, atomically), with the held-out accuracy in the
metadata. `--config.model.pretrained_dir=DIR` starts any stage from it.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from spcl_jax.infra import flag_errors
from spcl_jax.models import porting
from spcl_jax.run import pretraining

def main(argv):
  del argv
  config = flags.FLAGS.config
  output = os.path.expanduser(flags.FLAGS.output)  # `--output=~/...`
  try:
    porting.check_local_output(output)   # before minutes of pretraining
  except ValueError as e:
    raise SystemExit(f'error: {e}') from e
  backbone, summary = pretraining.pretrain(config)
  pretraining.write_backbone(output, config, backbone, summary)
  print(f'pretrained {config.model.name} backbone (base width '
        f'{config.model.base_width}): val accuracy '
        f'{summary["val_accuracy"]:.3f} in {summary["seconds"]:.0f} s -> '
        f'{output}')


if __name__ == '__main__':
  # defined here, not on import: the pipeline imports this module next to
  # spcl_jax.main's own --config flag
  config_flags.DEFINE_config_file('config', None, 'config file[:args]',
                                  lock_config=True)
  flags.DEFINE_string('output', None, 'directory to write')
  flags.mark_flags_as_required(['config', 'output'])
  app.run(main, flags_parser=flag_errors.parse_flags)
