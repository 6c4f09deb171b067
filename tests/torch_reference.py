"""Independent PyTorch references for parity tests (random weights only)."""

import numpy as np
import torch


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
  """Random affine parameters and running statistics for every BatchNorm, so
  that a porter that mixes up mean/var/scale/bias is caught."""
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      n = m.num_features
      m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
      m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
      m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
      m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def state_dict_numpy(model: torch.nn.Module):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().permute(0, 2, 3, 1).numpy()


def resnet_trunk(model, x: torch.Tensor) -> torch.Tensor:
  """torchvision ResNet up to layer4 (no pooling, no fc)."""
  x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
  return model.layer4(model.layer3(model.layer2(model.layer1(x))))


def deeplab_vgg16_trunk(model) -> torch.nn.Sequential:
  """torchvision `vgg16().features` as SPEC §2 modifies it: pool4 and pool5
  removed, conv5_x dilated by 2 (padding 2)."""
  layers = list(model.features.children())
  kept = [layer for i, layer in enumerate(layers) if i not in (23, 30)]
  for layer in kept[23:]:
    if isinstance(layer, torch.nn.Conv2d):
      layer.dilation, layer.padding = (2, 2), (2, 2)
  return torch.nn.Sequential(*kept)


def relative_error(ours, reference) -> float:
  ours, reference = np.asarray(ours), np.asarray(reference)
  return float(np.abs(ours - reference).max() / np.abs(reference).max())
