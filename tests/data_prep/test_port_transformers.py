"""The transformers porter: random SegFormer / MiT checkpoints written by
`save_pretrained` (no hub), ported, loaded by load_pretrained, and compared
with transformers' encoder; bad checkpoints refused in one line."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from data_prep import port_transformers
from spcl_jax.models import load_pretrained, mit

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
safetensors_numpy = pytest.importorskip('safetensors.numpy')
from benchmarks import segformer_reference as ref  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _port(src, dst, *extra):
  return subprocess.run(
      [sys.executable, '-m', 'data_prep.port_transformers', f'--src={src}',
       f'--dst={dst}', *extra],
      cwd=ROOT, capture_output=True, text=True, check=False,
      env={**os.environ, 'XLA_FLAGS': ''})


@pytest.fixture(scope='module')
def imagenet_b0(tmp_path_factory):
  """A random MiT-B0 ImageNet classifier saved as the hub's are."""
  torch.manual_seed(0)
  model = transformers.SegformerForImageClassification(
      ref.hf_config('b0', num_labels=1000)).eval()
  directory = tmp_path_factory.mktemp('ckpt') / 'mit-b0'
  model.save_pretrained(directory)
  return model, directory


def _encoder_maps(variables, images):
  from spcl_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_model('segformer_mit_b0', 19)
  return model.apply(variables, images,
                     method=lambda m, x: m.backbone(x, False))


def test_cli_port_then_load_pretrained_reproduces_transformers(imagenet_b0,
                                                               tmp_path):
  model, src = imagenet_b0
  dst = tmp_path / 'mit_b0'
  result = _port(src, dst)
  assert result.returncode == 0, result.stderr
  assert 'mit_b0' in result.stderr      # the variant read from config.json
  metadata = json.loads((dst / 'metadata.json').read_text())
  assert metadata['arch'] == 'mit_b0'
  assert metadata['not_loaded'] == ['classifier.bias', 'classifier.weight']
  variables = load_pretrained(str(dst), 'segformer_mit_b0', 19,
                              jax.random.key(0))
  images = np.random.default_rng(0).normal(size=(1, 45, 61, 3)).astype(
      np.float32)
  with torch.no_grad():
    theirs = model.segformer(torch.from_numpy(images.transpose(0, 3, 1, 2)),
                             output_hidden_states=True).hidden_states
  for ours, expected in zip(_encoder_maps(variables, images), theirs):
    assert ref.relative_error(
        ours, expected.numpy().transpose(0, 2, 3, 1)) <= 1e-4
  # the head is fresh, and complete: the model applies
  assert set(variables['params']['classifier']) >= {'fuse', 'logits'}
  assert variables['batch_stats']['classifier']['fuse_bn']['var'].shape == (
      256,)


def test_both_key_namings_and_bin_files_port_alike(imagenet_b0, tmp_path):
  """save_pretrained writes transformers 4.x names (the hub's); a 5.x
  state dict has the new ones: both port to the same weights."""
  model, src = imagenet_b0
  assert 'segformer.encoder.block.1.0.attention.self.sr.weight' in (
      safetensors_numpy.load_file(src / 'model.safetensors'))
  modern = tmp_path / 'modern'
  modern.mkdir()
  (modern / 'config.json').write_text((src / 'config.json').read_text())
  torch.save(model.state_dict(), modern / 'pytorch_model.bin')
  assert ('segformer.stages.1.blocks.0.attention.sequence_reduction.'
          'sequence_reduction.weight') in torch.load(
              modern / 'pytorch_model.bin')
  assert port_transformers.convert(str(modern), str(tmp_path / 'a')) == (
      'mit_b0')
  assert port_transformers.convert(str(src), str(tmp_path / 'b')) == 'mit_b0'
  a = load_pretrained(str(tmp_path / 'a'), 'segformer_mit_b0', 19,
                      jax.random.key(0))
  b = load_pretrained(str(tmp_path / 'b'), 'segformer_mit_b0', 19,
                      jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_wrong_variant_one_line_naming_parameter_and_shapes(imagenet_b0,
                                                            tmp_path):
  _, src = imagenet_b0
  dst = tmp_path / 'out'
  result = _port(src, dst, '--arch=mit_b5')
  assert result.returncode != 0
  error = result.stderr.strip().splitlines()[-1]
  assert error.startswith('error: ')
  assert 'hidden_sizes (32, 64, 160, 256), mit_b5 has (64, 128, 320, 512)' in (
      error)
  assert not dst.exists() and os.listdir(tmp_path) == []


def test_config_that_lies_about_shapes_is_caught_by_the_weights(imagenet_b0,
                                                               tmp_path):
  _, src = imagenet_b0
  fake = tmp_path / 'fake'
  fake.mkdir()
  config = json.loads((src / 'config.json').read_text())
  config['depths'] = [2, 2, 2, 3]      # says one more block than it holds
  (fake / 'config.json').write_text(json.dumps(config))
  (fake / 'model.safetensors').write_bytes(
      (src / 'model.safetensors').read_bytes())
  with pytest.raises(port_transformers.CheckpointError,
                     match=r'depths \(2, 2, 2, 3\), .* match no MiT'):
    port_transformers.convert(str(fake), str(tmp_path / 'o'))
  config['depths'] = [2, 2, 2, 2]
  config['hidden_sizes'] = [32, 64, 160, 256]
  weights = safetensors_numpy.load_file(src / 'model.safetensors')
  key = 'segformer.encoder.block.2.0.mlp.dense1.weight'
  weights[key] = weights[key][:10]
  safetensors_numpy.save_file(weights, fake / 'model.safetensors')
  (fake / 'config.json').write_text(json.dumps(config))
  with pytest.raises(port_transformers.CheckpointError) as error:
    port_transformers.convert(str(fake), str(tmp_path / 'o'))
  assert '\n' not in str(error.value)
  assert f'{key} has shape (10, 160), expected ' in str(error.value)
  assert '(640, 160)' in str(error.value)
  assert not (tmp_path / 'o').exists()


def test_not_a_segformer_checkpoint(tmp_path):
  vit = tmp_path / 'vit'
  vit.mkdir()
  (vit / 'config.json').write_text(json.dumps({'model_type': 'vit'}))
  with pytest.raises(port_transformers.CheckpointError,
                     match=r"model_type is 'vit', expected 'segformer'"):
    port_transformers.convert(str(vit), str(tmp_path / 'o'))
  with pytest.raises(port_transformers.CheckpointError, match='config.json'):
    port_transformers.convert(str(tmp_path), str(tmp_path / 'o'))
  (vit / 'config.json').write_text(json.dumps(
      {'model_type': 'segformer', **{k: list(getattr(
          mit.MIT_VARIANTS['b0'], v)) for k, v in
          port_transformers.CONFIG_FIELDS.items()}, 'mlp_ratios': [4] * 4}))
  with pytest.raises(port_transformers.CheckpointError,
                     match='no model.safetensors'):
    port_transformers.convert(str(vit), str(tmp_path / 'o'))
  (vit / 'model.safetensors').write_bytes(b'not a safetensors file')
  with pytest.raises(port_transformers.CheckpointError,
                     match='model.safetensors: not readable as safetensors'):
    port_transformers.convert(str(vit), str(tmp_path / 'o'))
  (vit / 'model.safetensors').unlink()
  assert sorted(os.listdir(tmp_path)) == ['vit']


def test_load_pretrained_refuses_other_variant(imagenet_b0, tmp_path):
  _, src = imagenet_b0
  port_transformers.convert(str(src), str(tmp_path / 'b0'))
  with pytest.raises(ValueError, match='holds mit_b0 weights but '
                     'segformer_mit_b1 needs mit_b1.*port_transformers'):
    load_pretrained(str(tmp_path / 'b0'), 'segformer_mit_b1', 19,
                    jax.random.key(0))
