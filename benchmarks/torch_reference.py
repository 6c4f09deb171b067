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


# ------------------------------------------- the released training steps --
# Written from the released recipe (SPEC §2; warmup.py and train_ssl.py of
# BinhuiXie/SPCL) with torch modules and torch.optim, for the step-level
# parity tests (tests/test_step_parity.py). NCHW tensors throughout.


def poly_lr(base_lr: float, iteration: int, max_iters: int,
            power: float) -> float:
  """The released `adjust_learning_rate('poly', ...)`."""
  return base_lr * (1 - iteration / max_iters) ** power


class FrozenBatchNorm2d(torch.nn.Module):
  """The released frozen BatchNorm: statistics and affine parameters are
  buffers (never trained, never decayed), `epsilon` 0 in the release."""

  def __init__(self, n: int, epsilon: float = 0.0):
    super().__init__()
    for name, value in (('weight', torch.ones(n)), ('bias', torch.zeros(n)),
                        ('running_mean', torch.zeros(n)),
                        ('running_var', torch.ones(n))):
      self.register_buffer(name, value)
    self.epsilon = epsilon

  def forward(self, x):
    scale = self.weight * (self.running_var + self.epsilon).rsqrt()
    bias = self.bias - self.running_mean * scale
    return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


def fc_discriminator(num_classes: int, widths=(64, 128, 256, 512),
                     negative_slope: float = 0.2) -> torch.nn.Sequential:
  """AdaptSegNet's FCDiscriminator: 4x4 stride-2 convolutions (padding 1)
  C -> widths -> 1, LeakyReLU between them; child 2i is convolution i."""
  layers, sizes = [], (num_classes, *widths, 1)
  for i in range(len(sizes) - 1):
    layers.append(torch.nn.Conv2d(sizes[i], sizes[i + 1], 4, stride=2,
                                  padding=1))
    if i < len(sizes) - 2:
      layers.append(torch.nn.LeakyReLU(negative_slope))
  return torch.nn.Sequential(*layers)


def segmenter_optimizers(feature_extractor, classifier, lr, momentum,
                         weight_decay):
  """The released pair: SGD on the feature extractor, SGD at 10 x the rate
  on the classifier (the iteration functions set the poly rates)."""
  def sgd(module, rate):
    return torch.optim.SGD(module.parameters(), lr=rate, momentum=momentum,
                           weight_decay=weight_decay)
  return sgd(feature_extractor, lr), sgd(classifier, 10 * lr)


def _set_lr(optimizer, lr):
  for group in optimizer.param_groups:
    group['lr'] = lr


def _grads(*modules):
  return {f'{i}.{name}': p.grad.detach().clone()
          for i, module in enumerate(modules)
          for name, p in module.named_parameters() if p.grad is not None}


def released_warmup_iteration(feature_extractor, classifier, model_d,
                              optimizers, src_input, src_label, tgt_input, *,
                              iteration, base_lr, base_lr_d, max_iters, power,
                              lambda_adv=0.001, temperature=1.8,
                              source_label=0.0, target_label=1.0):
  """One iteration of the released warm-up (output-space adversarial
  training, AdaptSegNet style). `optimizers` = (fea, cls, D).

  G: CE(up(src) / T) + λ_adv BCE(D(softmax(up(tgt))), source_label), with D
  frozen (requires_grad False). D: BCE(D(softmax(up(src) / T)), source) / 2
  + BCE(D(softmax(up(tgt))), target) / 2 on detached outputs, with the D
  parameters of before this iteration's update. All three optimisers step at
  the end. Defaults: the released constants (λ_adv 0.001 as
  LAMBDA_ADV_TARGET, T 1.8, labels source 0 / target 1). Returns the loss
  terms, the rates, the gradients (keys
  '0.<name>' feature extractor, '1.<name>' classifier, '2.<name>' D)."""
  opt_fea, opt_cls, opt_d = optimizers
  lr = poly_lr(base_lr, iteration, max_iters, power)
  lr_d = poly_lr(base_lr_d, iteration, max_iters, power)
  _set_lr(opt_fea, lr)
  _set_lr(opt_cls, 10 * lr)
  _set_lr(opt_d, lr_d)
  for optimizer in optimizers:
    optimizer.zero_grad()
  bce = torch.nn.BCEWithLogitsLoss()

  def full(t, like):
    return torch.full_like(like, t)

  for p in model_d.parameters():
    p.requires_grad = False
  src_pred = torch.nn.functional.interpolate(
      classifier(feature_extractor(src_input)), size=src_input.shape[-2:],
      mode='bilinear', align_corners=True) / temperature
  loss_seg = torch.nn.functional.cross_entropy(src_pred, src_label,
                                               ignore_index=255)
  loss_seg.backward()
  tgt_pred = torch.nn.functional.interpolate(
      classifier(feature_extractor(tgt_input)), size=tgt_input.shape[-2:],
      mode='bilinear', align_corners=True)
  d_out = model_d(torch.softmax(tgt_pred, dim=1))
  loss_adv = bce(d_out, full(source_label, d_out))
  (lambda_adv * loss_adv).backward()

  for p in model_d.parameters():
    p.requires_grad = True
  d_out = model_d(torch.softmax(src_pred.detach(), dim=1))
  loss_d_src = bce(d_out, full(source_label, d_out)) / 2
  loss_d_src.backward()
  d_out = model_d(torch.softmax(tgt_pred.detach(), dim=1))
  loss_d_tgt = bce(d_out, full(target_label, d_out)) / 2
  loss_d_tgt.backward()

  grads = _grads(feature_extractor, classifier, model_d)
  for optimizer in optimizers:
    optimizer.step()
  return {'seg_loss': loss_seg.item(), 'adv_loss': loss_adv.item(),
          'loss': loss_seg.item() + lambda_adv * loss_adv.item(),
          'disc_loss': loss_d_src.item() + loss_d_tgt.item(),
          'grad_norm': float(torch.sqrt(sum(
              (g ** 2).sum() for k, g in grads.items() if k[0] != '2'))),
          'lr': lr, 'grads': grads}


def released_self_training_iteration(feature_extractor, classifier,
                                     optimizers, tgt_input, tgt_label, *,
                                     iteration, base_lr, max_iters, power,
                                     src_input=None, src_label=None,
                                     source_weight=1.0,
                                     source_temperature=1.0):
  """One iteration of the released self-training (train_ssl.py): CE of the
  upsampled target logits against the pseudo labels, no temperature, the
  model in train mode (trainable BN updates its running statistics).

  With `src_input` (our joint variant, not in the release): the source
  batch is forwarded first (its own BN batch statistics), and
  `source_weight` x CE(up(src) / source_temperature) is added."""
  opt_fea, opt_cls = optimizers
  lr = poly_lr(base_lr, iteration, max_iters, power)
  _set_lr(opt_fea, lr)
  _set_lr(opt_cls, 10 * lr)
  opt_fea.zero_grad()
  opt_cls.zero_grad()

  def ce(images, labels, temperature=1.0):
    pred = torch.nn.functional.interpolate(
        classifier(feature_extractor(images)), size=labels.shape[-2:],
        mode='bilinear', align_corners=True)
    return torch.nn.functional.cross_entropy(pred / temperature, labels,
                                             ignore_index=255)

  loss_src = torch.zeros((), dtype=torch.float64)
  if src_input is not None:
    loss_src = ce(src_input, src_label, source_temperature)
  loss_tgt = ce(tgt_input, tgt_label)
  loss = loss_tgt + source_weight * loss_src
  loss.backward()
  grads = _grads(feature_extractor, classifier)
  opt_fea.step()
  opt_cls.step()
  return {'loss': loss.item(), 'seg_loss': loss_tgt.item(),
          'source_seg_loss': loss_src.item(),
          'grad_norm': float(torch.sqrt(sum((g ** 2).sum()
                                            for g in grads.values()))),
          'lr': lr, 'grads': grads}
