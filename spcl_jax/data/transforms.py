"""The recipe's per-record transforms as grain maps: record checks (label
space, invalid labels), resize, colour jitter (float and the release's PIL
implementation), random scale / crop / flip, and ImageNet normalisation."""

import dataclasses
import math

import grain
import numpy as np
from PIL import Image

from spcl_jax.core import labels as label_table
from spcl_jax.data import codecs
from spcl_jax.data import resize


@dataclasses.dataclass(frozen=True)
class CheckRecord(grain.transforms.Map):
  """Validates a record: label [H, W] (or [H, W, 1]) matching the image's
  size, else an error naming the `image_id`. Label values outside
  [0, num_classes) other than 255 become 255 and are counted in
  `invalid_label_pixels` for the training loop to report. Stored trainIds
  are first mapped to the classes of `label_space` (labels.trainid_lut)."""
  num_classes: int
  label_space: str = 'cityscapes19'

  def map(self, record):
    image_id = codecs.as_str(record['image_id'])
    image, label = np.asarray(record['image']), np.asarray(record['label'])
    if label.ndim == 3 and label.shape[-1] == 1:
      label = label[..., 0]
    if image.ndim != 3 or image.shape[-1] != 3 or label.ndim != 2:
      raise ValueError(f'record {image_id!r}: expected image [H, W, 3] and '
                       f'label [H, W], got {image.shape} and {label.shape}')
    if image.shape[:2] != label.shape:
      raise ValueError(f'record {image_id!r}: image size {image.shape[:2]} '
                       f'and label size {label.shape} differ')
    label = label_table.trainid_lut(self.label_space)[label]
    invalid = (label >= self.num_classes) & (label != label_table.IGNORE_LABEL)
    return {'image': image, 'label': np.where(invalid, label_table.IGNORE_LABEL,
                                              label).astype(np.uint8),
            'image_id': image_id, 'valid': True,
            'invalid_label_pixels': np.int32(invalid.sum())}


@dataclasses.dataclass(frozen=True)
class Resize(grain.transforms.Map):
  """Resizes the image (`interpolation`: a key of resize.INTERPOLATIONS) and, unless
  told otherwise, the label (nearest) to `size`."""
  size: tuple  # (height, width)
  resize_label: bool = True
  interpolation: str = 'bilinear'

  def map(self, element):
    label = element['label']
    return {**element,
            'image': resize.resize_array(
                element['image'], self.size,
                resize.INTERPOLATIONS[self.interpolation]),
            'label': resize.resize_label(label, self.size) if self.resize_label
            else label}


def _rgb_to_hsv(rgb):
  """Vectorised `colorsys.rgb_to_hsv` for float arrays in [0, 1]."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  maxc, minc = rgb.max(-1), rgb.min(-1)
  v = maxc
  delta = maxc - minc
  s = np.where(maxc > 0, delta / np.maximum(maxc, 1e-12), 0)
  safe = np.maximum(delta, 1e-12)
  rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
  h = np.where(r == maxc, bc - gc, np.where(g == maxc, 2.0 + rc - bc,
                                            4.0 + gc - rc))
  h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
  return np.stack([h, s, v], -1)


def _hsv_to_rgb(hsv):
  """Vectorised `colorsys.hsv_to_rgb`."""
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  i = np.floor(h * 6.0)
  f = h * 6.0 - i
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  i = i.astype(np.int32) % 6
  choices = [np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t),
                                       (p, q, v), (t, p, v), (v, p, q))]
  return np.choose(i[..., None], choices)


def color_jitter(image: np.ndarray, rng: np.random.Generator,
                 brightness: float, contrast: float, saturation: float,
                 hue: float) -> np.ndarray:
  """torchvision's ColorJitter on a uint8 RGB image: factors drawn uniformly
  from [max(0, 1 - x), 1 + x] (hue shift from [-hue, hue]), the four
  operations applied in random order, clipped to [0, 1] after each."""
  x = image.astype(np.float32) / 255.0
  gray = lambda x: x @ np.array([0.299, 0.587, 0.114], np.float32)
  for op in rng.permutation(4):
    if op == 0 and brightness:
      x = np.clip(x * rng.uniform(max(0, 1 - brightness), 1 + brightness),
                  0, 1)
    elif op == 1 and contrast:
      f = rng.uniform(max(0, 1 - contrast), 1 + contrast)
      x = np.clip(f * x + (1 - f) * gray(x).mean(), 0, 1)
    elif op == 2 and saturation:
      f = rng.uniform(max(0, 1 - saturation), 1 + saturation)
      x = np.clip(f * x + (1 - f) * gray(x)[..., None], 0, 1)
    elif op == 3 and hue:
      hsv = _rgb_to_hsv(x)
      hsv[..., 0] = (hsv[..., 0] + rng.uniform(-hue, hue)) % 1.0
      x = np.clip(_hsv_to_rgb(hsv), 0, 1)
  return np.round(x * 255.0).astype(np.uint8)


def jitter_params(rng: np.random.Generator, brightness: float,
                  contrast: float, saturation: float, hue: float):
  """torchvision's `ColorJitter.get_params` drawn from `rng`: (the order of
  the operations 0-3 = brightness, contrast, saturation, hue, [factor or
  None for each]). Factors are uniform in [max(0, 1 - x), 1 + x], the hue
  shift in [-hue, hue]; an operation whose parameter is 0 gets None (it is
  skipped, as in torchvision)."""
  order = rng.permutation(4)
  factors = [rng.uniform(max(0.0, 1 - x), 1 + x) if x else None
             for x in (brightness, contrast, saturation)]
  factors.append(rng.uniform(-hue, hue) if hue else None)
  return order, factors


def adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
  """torchvision's PIL `adjust_hue`: the uint8 hue of PIL's HSV image
  shifted by int(hue_factor * 255), wrapping around (a PIL point table on
  the H band instead of a NumPy round trip: the same bytes)."""
  if not -0.5 <= hue_factor <= 0.5:
    raise ValueError(f'hue factor {hue_factor} is not in [-0.5, 0.5]')
  shift = int(hue_factor * 255)   # truncated toward 0, as np.int32() does
  table = [(v + shift) % 256 for v in range(256)] + list(range(256)) * 2
  return image.convert('HSV').point(table).convert('RGB')


def adjust_color(image: Image.Image, op: int, factor: float) -> Image.Image:
  """Operation `op` of torchvision's PIL colour functions: 0 brightness,
  1 contrast, 2 saturation (PIL `ImageEnhance`), 3 hue (`adjust_hue`);
  uint8 after each."""
  from PIL import ImageEnhance  # pylint: disable=g-import-not-at-top
  if op == 3:
    return adjust_hue(image, factor)
  if factor < 0:
    raise ValueError(f'colour factor {factor} of operation {op} is negative')
  enhance = (ImageEnhance.Brightness, ImageEnhance.Contrast,
             ImageEnhance.Color)[op]
  return enhance(image).enhance(factor)


def released_color_jitter(image: np.ndarray, rng: np.random.Generator,
                          brightness: float, contrast: float,
                          saturation: float, hue: float) -> np.ndarray:
  """The released transform, torchvision's `ColorJitter(brightness,
  contrast, saturation, hue)` on a PIL image, on a uint8 RGB image: the
  factors and random order of `jitter_params`, each operation rounded to
  uint8 as PIL does (`adjust_color`). The same bytes as torchvision for the
  same factors and order; ~5x faster than `color_jitter`."""
  order, factors = jitter_params(rng, brightness, contrast, saturation, hue)
  pil = Image.fromarray(np.ascontiguousarray(image))
  for op in order:
    if factors[op] is not None:
      pil = adjust_color(pil, int(op), factors[op])
  return np.asarray(pil)


# `ColorJitter.implementation`: 'float' is the float HSV jitter the demo's
# recorded results were made with, 'released' the PIL (torchvision) one.
COLOR_JITTERS = {'float': color_jitter, 'released': released_color_jitter}


@dataclasses.dataclass(frozen=True)
class ColorJitter(grain.transforms.RandomMap):
  """Colour jitter of the image with grain's per-record generator (so
  deterministic per record); `implementation` is a key of COLOR_JITTERS."""
  brightness: float
  contrast: float
  saturation: float
  hue: float
  implementation: str = 'float'

  def __post_init__(self):
    if self.implementation not in COLOR_JITTERS:
      raise ValueError(f'colour jitter implementation '
                       f'{self.implementation!r} is not one of '
                       f'{sorted(COLOR_JITTERS)}')
    if min(self.brightness, self.contrast, self.saturation) < 0 or not (
        0 <= self.hue <= 0.5):
      raise ValueError(
          f'colour jitter (brightness, contrast, saturation, hue) = '
          f'{(self.brightness, self.contrast, self.saturation, self.hue)}: '
          'the first three must be >= 0 and hue in [0, 0.5]')

  def random_map(self, element, rng: np.random.Generator):
    image = COLOR_JITTERS[self.implementation](
        element['image'], rng, self.brightness, self.contrast,
        self.saturation, self.hue)
    return {**element, 'image': image}


# `data.scaled_size_rounding`: how the random scale's size (a side times the
# scale) becomes an integer: 'round' to the nearest, or 'floor' (the
# released transforms' int()).
SCALED_SIZE_ROUNDINGS = {'round': lambda x: int(round(x)), 'floor': math.floor}


def scale_crop_flip(image, label, rng, scale_range, crop, flip, fill,
                    interpolation: str = 'bilinear', rounding: str = 'round'):
  """Random scale (the image with `interpolation`, a key of resize.INTERPOLATIONS;
  the label nearest; each side times the scale made an integer by
  `rounding`, a key of SCALED_SIZE_ROUNDINGS), pad to the crop size (image
  with `fill`, label with 255), random crop, random horizontal flip."""
  if scale_range is not None:
    s = rng.uniform(*scale_range)
    to_int = SCALED_SIZE_ROUNDINGS[rounding]
    size = (max(1, to_int(image.shape[0] * s)),
            max(1, to_int(image.shape[1] * s)))
    image = resize.resize_array(image, size, resize.INTERPOLATIONS[interpolation])
    label = resize.resize_label(label, size)
  if crop is not None:
    ch, cw = crop
    h, w = label.shape
    if h < ch or w < cw:
      ph, pw = max(ch - h, 0), max(cw - w, 0)
      image = np.concatenate([image, np.broadcast_to(
          np.asarray(fill, np.uint8), (ph, image.shape[1], 3))], 0) if ph else image
      label = np.pad(label, ((0, ph), (0, 0)), constant_values=label_table.IGNORE_LABEL)
      image = np.concatenate([image, np.broadcast_to(
          np.asarray(fill, np.uint8), (image.shape[0], pw, 3))], 1) if pw else image
      label = np.pad(label, ((0, 0), (0, pw)), constant_values=label_table.IGNORE_LABEL)
      h, w = label.shape
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    image = image[top:top + ch, left:left + cw]
    label = label[top:top + ch, left:left + cw]
  if flip and rng.random() < 0.5:
    image, label = image[:, ::-1], label[:, ::-1]
  return np.ascontiguousarray(image), np.ascontiguousarray(label)


@dataclasses.dataclass(frozen=True)
class RandomScaleCropFlip(grain.transforms.RandomMap):
  scale_range: tuple | None
  crop: tuple | None
  flip: bool
  fill: tuple  # uint8 RGB used to pad images (the mean colour)
  interpolation: str = 'bilinear'   # of the image's scaling (resize.INTERPOLATIONS)
  rounding: str = 'round'   # of the scaled size (SCALED_SIZE_ROUNDINGS)

  def random_map(self, element, rng: np.random.Generator):
    image, label = scale_crop_flip(element['image'], element['label'], rng,
                                   self.scale_range, self.crop, self.flip,
                                   self.fill, self.interpolation,
                                   self.rounding)
    return {**element, 'image': image, 'label': label}


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
  mean: tuple
  std: tuple

  def map(self, element):
    image = (element['image'].astype(np.float32) / 255.0
             - np.asarray(self.mean, np.float32)) / np.asarray(self.std,
                                                               np.float32)
    return {**element, 'image': image,
            'label': element['label'].astype(np.int32)}
