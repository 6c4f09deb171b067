"""An independent PyTorch reference for the SegFormer parity tests and
benchmarks: `transformers`' SegformerForSemanticSegmentation with random
weights, and its weights as our variables (the decode head's mapping is
written here, apart from the library's encoder porting)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from benchmarks.torch_reference import relative_error
from spcl_jax.models import mit
from spcl_jax.models import porting


def hf_config(variant: str, num_labels: int, **kw):
  v = mit.MIT_VARIANTS[variant]
  return transformers.SegformerConfig(
      hidden_sizes=list(v.widths), depths=list(v.depths),
      num_attention_heads=list(v.heads), sr_ratios=list(v.reductions),
      decoder_hidden_size=v.decoder_width, mlp_ratios=[v.mlp_ratio] * 4,
      patch_sizes=list(v.patch_sizes), strides=list(v.strides),
      num_labels=num_labels, **kw)


def random_segformer(variant: str, num_labels: int, seed: int = 0, **kw):
  """transformers' SegFormer of our `variant` (in eval mode), random
  weights, random head BatchNorm statistics and biases; `kw`: more
  SegformerConfig fields (drop_path_rate, classifier_dropout_prob)."""
  torch.manual_seed(seed)
  model = transformers.SegformerForSemanticSegmentation(
      hf_config(variant, num_labels, **kw)).eval()
  with torch.no_grad():  # non-trivial head BatchNorm statistics and biases
    bn = model.decode_head.batch_norm
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.uniform_(-0.2, 0.2)
    for name, p in model.named_parameters():
      if name.endswith('.bias'):
        p.uniform_(-0.1, 0.1)
  return model


def head_variables(state_dict) -> dict:
  """Our decode head's variables from transformers' `decode_head.*` keys (a
  mapping written here, beside the library's encoder porting)."""
  def linear(key):
    return {'kernel': state_dict[f'{key}.weight'].T,
            'bias': state_dict[f'{key}.bias']}
  params = {f'linear_c{i + 1}': linear(f'decode_head.linear_projections.{i}.proj')
            for i in range(4)}
  params['fuse'] = {'kernel': np.transpose(
      state_dict['decode_head.linear_fuse.weight'], (2, 3, 1, 0))}
  params['fuse_bn'] = {'scale': state_dict['decode_head.batch_norm.weight'],
                       'bias': state_dict['decode_head.batch_norm.bias']}
  params['logits'] = {
      'kernel': np.transpose(state_dict['decode_head.classifier.weight'],
                             (2, 3, 1, 0)),
      'bias': state_dict['decode_head.classifier.bias']}
  stats = {'fuse_bn': {
      'mean': state_dict['decode_head.batch_norm.running_mean'],
      'var': state_dict['decode_head.batch_norm.running_var']}}
  return {'params': params, 'batch_stats': stats}


def ported_variables(torch_model, variant: str) -> dict:
  state_dict = {k: v.detach().numpy() for k, v in
                torch_model.state_dict().items()}
  encoder = {k[len('segformer.'):]: v for k, v in state_dict.items()
             if k.startswith('segformer.')}
  backbone = porting.port_state_dict(f'mit_{variant}', encoder)
  head = head_variables(state_dict)
  return jax.tree.map(jnp.asarray, {
      'params': {'backbone': backbone['params'],
                 'classifier': head['params']},
      'batch_stats': {'classifier': head['batch_stats']}})



__all__ = ['hf_config', 'random_segformer', 'head_variables',
           'ported_variables', 'relative_error']
