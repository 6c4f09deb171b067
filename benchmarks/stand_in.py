"""Stand-in backbone weights for the benchmarks that run a full-size
network without an ImageNet download (benchmarks.full_size_run,
benchmarks.contrastive_logit_range)."""

import os


def stand_in_weights(directory: str, name: str, base_width: int) -> str:
  """DIR/<name>_w<base_width>: the backbone of `name` at its fresh
  initialisation with every residual block's last BatchNorm scale zeroed
  (each block starts as the identity, as torchvision's
  `zero_init_residual`), written as ported ImageNet weights are
  (`porting.save_ported`), so that a frozen-BatchNorm stage's activations
  stay finite through ResNet-101's 33 blocks. Made once."""
  # pylint: disable=g-import-not-at-top
  import flax
  import jax
  from spcl_jax import models
  from spcl_jax.models import porting
  # pylint: enable=g-import-not-at-top
  path = os.path.join(directory, f'{name}_w{base_width}')
  if os.path.exists(os.path.join(path, porting.METADATA_FILE)):
    return path
  model = models.create_model(name, 19, base_width=base_width)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  backbone = {kind: variables[kind]['backbone']
              for kind in ('params', 'batch_stats')}
  params = flax.traverse_util.flatten_dict(backbone['params'])
  # the last BatchNorm of a bottleneck block (ResNet-50/101) or a basic one
  last = 'bn3' if any(key[-2] == 'bn3' for key in params) else 'bn2'
  for key in params:
    if (len(key) >= 3 and key[-3].startswith('layer') and key[-2] == last
        and key[-1] == 'scale'):
      params[key] = params[key] * 0
  backbone['params'] = flax.traverse_util.unflatten_dict(params)
  porting.save_ported(path, models.check_name(name).arch,
                      jax.device_get(backbone),
                      {'source': 'benchmarks stand-in: fresh '
                                 'initialisation, zero-init residual blocks',
                       'base_width': base_width})
  return path
