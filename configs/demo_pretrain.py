"""Pretraining of the demo's backbone on object-centric classification
(`data_prep/pretrain_render.py`): the demo's stand-in for ImageNet weights.

`python -m spcl_jax.pretrain --config=configs/demo_pretrain.py --output=DIR`
writes DIR in the layout of `data_prep.port_torchvision`, which
`--config.model.pretrained_dir=DIR` (or `configs/demo.py:pretrained`) reads.
Variants: `smoke` (a few steps on a few images, for tests); `mit` (the
narrow Mix Transformer of `configs/demo.py:mit`, with AdamW).
"""

import ml_collections


def smoke(config):
  config.train_images, config.val_images = 64, 32
  config.batch_size, config.steps, config.eval_every_steps = 16, 4, 2
  config.image_size = 32
  config.log_every_steps = 2
  config.warmup_steps = 1


def mit(config):
  """The MiT demo encoder (`segformer_mit_demo`); a transformer trains
  with AdamW (SGD's rate of 0.1 diverges there), as ImageNet MiTs are."""
  config.model.name = 'segformer_mit_demo'
  config.model.base_width = 64   # unused: the variant fixes the widths
  config.optimizer = 'adamw'
  config.lr = 2e-3
  config.weight_decay = 0.05


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  # the backbone it pretrains: must match the demo's model
  c.model = ml_collections.ConfigDict({
      'name': 'deeplabv2_resnet18',
      'base_width': 16,
  })
  c.image_size = 64
  # images rendered once (seeds apart from the demo splits) and held in memory
  c.train_images = 24000
  c.val_images = 1000
  c.batch_size = 64
  c.steps = 1500
  c.optimizer = 'sgd'        # Nesterov momentum; or 'adamw'
  c.lr = 0.1                 # cosine decay after a linear warm-up
  c.warmup_steps = 100
  c.momentum = 0.9
  c.weight_decay = 1e-4
  c.pad_crop = 4             # random crop from the image padded by this much
  c.flip = True
  c.eval_every_steps = 500
  c.log_every_steps = 100
  c.mean = (0.485, 0.456, 0.406)  # the pipeline's normalisation
  c.std = (0.229, 0.224, 0.225)
  variants = {'smoke': smoke, 'mit': mit}
  for token in filter(None, (t.strip() for t in (arg or '').split(','))):
    if token not in variants:
      raise ValueError(f'unknown config argument {token!r}; expected one of '
                       f'{sorted(variants)}')
    variants[token](c)
  return c
