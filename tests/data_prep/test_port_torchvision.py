"""The porter CLI and load_pretrained, end to end on random torchvision
weights (no downloads)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torchvision

from benchmarks import torch_reference as ref
from spcl_jax.models import create_model, load_pretrained
from spcl_jax.models import porting

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _port(arch, src, dst, *extra):
  return subprocess.run(
      [sys.executable, '-m', 'data_prep.port_torchvision', f'--arch={arch}',
       f'--src={src}', f'--dst={dst}', *extra],
      cwd=ROOT, capture_output=True, text=True, check=False)


@pytest.fixture(scope='module')
def resnet18_pth(tmp_path_factory):
  torch.manual_seed(0)
  model = torchvision.models.resnet18(weights=None).eval()
  ref.randomize_batchnorm(model)
  path = tmp_path_factory.mktemp('pth') / 'resnet18.pth'
  torch.save(model.state_dict(), path)
  return model, path


def test_cli_port_then_load_pretrained_reproduces_torchvision(resnet18_pth,
                                                              tmp_path):
  model, src = resnet18_pth
  dst = tmp_path / 'r18'
  result = _port('resnet18', src, dst)
  assert result.returncode == 0, result.stderr
  assert sorted(os.listdir(dst)) == ['metadata.json', 'weights']
  variables = load_pretrained(str(dst), 'deeplabv2_resnet18', 19,
                              jax.random.key(0))
  # The backbone equals torchvision's (checked undilated: torchvision has no
  # dilated BasicBlock); the head is fresh: N(0, 0.01) kernels, zero bias.
  from spcl_jax.models import resnet  # pylint: disable=g-import-not-at-top
  x = np.random.RandomState(0).randn(1, 64, 64, 3).astype(np.float32)
  backbone = {c: variables[c]['backbone'] for c in ('params', 'batch_stats')}
  ours = resnet.resnet(18, strides_to_dilation=(False,) * 3).apply(backbone, x)
  with torch.no_grad():
    expected = ref.nhwc(ref.resnet_trunk(model, ref.nchw(x)))
  assert ref.relative_error(ours, expected) <= 1e-4
  head = variables['params']['classifier']['branch0']
  assert head['kernel'].shape == (3, 3, 512, 19)
  assert 0.005 < float(np.std(head['kernel'])) < 0.02
  # complete: it applies to the model that create_model builds
  out = create_model('deeplabv2_resnet18', 19).apply(variables, x)
  assert out['logits'].shape == (1, 8, 8, 19)


def test_wrong_architecture_exits_nonzero_lists_keys_writes_nothing(
    resnet18_pth, tmp_path):
  _, src = resnet18_pth
  dst = tmp_path / 'out'
  result = _port('resnet50', src, dst)
  assert result.returncode != 0
  assert 'layer1.0.conv3.weight' in result.stderr       # missing
  assert 'wrong shape for layer1.0.conv1.weight' in result.stderr
  assert not dst.exists()
  assert os.listdir(tmp_path) == []  # no temporary left behind either


def test_unexpected_and_missing_keys_are_listed():
  torch.manual_seed(0)
  state = ref.state_dict_numpy(torchvision.models.resnet18(weights=None))
  state['extra.weight'] = np.zeros(3, np.float32)
  del state['layer2.1.bn2.running_var']
  with pytest.raises(porting.PortingError) as e:
    porting.port_state_dict('resnet18', state)
  assert e.value.unexpected == ['extra.weight']
  assert e.value.missing == ['layer2.1.bn2.running_var']
  # fc.* is not loaded on purpose and never reported
  assert 'fc.weight' not in str(e.value)


def test_load_pretrained_refuses_other_architecture(resnet18_pth, tmp_path):
  _, src = resnet18_pth
  assert _port('resnet18', src, tmp_path / 'r18').returncode == 0
  with pytest.raises(ValueError, match='needs resnet101'):
    load_pretrained(str(tmp_path / 'r18'), 'deeplabv2_resnet101', 19,
                    jax.random.key(0))
  with pytest.raises(FileNotFoundError, match='port_torchvision'):
    load_pretrained(str(tmp_path), 'deeplabv2_resnet18', 19, jax.random.key(0))


def test_existing_destination_needs_overwrite(resnet18_pth, tmp_path):
  _, src = resnet18_pth
  dst = tmp_path / 'r18'
  assert _port('resnet18', src, dst).returncode == 0
  again = _port('resnet18', src, dst)
  assert again.returncode != 0 and '--overwrite' in again.stderr
  assert _port('resnet18', src, dst, '--overwrite').returncode == 0
  assert sorted(os.listdir(tmp_path)) == ['r18']


def test_vgg16_load_pretrained_keeps_fc_fresh(tmp_path):
  torch.manual_seed(0)
  model = torchvision.models.vgg16(weights=None)
  torch.save(model.state_dict(), tmp_path / 'vgg.pth')
  assert _port('vgg16', tmp_path / 'vgg.pth', tmp_path / 'v').returncode == 0
  variables = load_pretrained(str(tmp_path / 'v'), 'deeplabv2_vgg16', 19,
                              jax.random.key(0))
  params = variables['params']['backbone']
  np.testing.assert_array_equal(
      params['trunk']['conv5_3']['kernel'],
      model.features[28].weight.detach().numpy().transpose(2, 3, 1, 0))
  assert params['fc6']['kernel'].shape == (3, 3, 512, 1024)
