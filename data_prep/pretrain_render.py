"""Object-centric images for pretraining the demo's backbone: the stand-in
for ImageNet initialisation.

`render(seed, size)` returns `(image uint8 [size, size, 3], category int)`:
one object of `CATEGORIES[category]`, centred and large, in front of a
cluttered background, in a randomised camera appearance.

What it shares with ImageNet, and why that is the honest analogue:
  * a *different task and label set*: image-level classification of one
    object among 16 kinds, never a pixel label and never the 19 classes;
    six of the kinds (ring, cross, triangle, diamond, dumbbell, arch)
    appear in no street scene, and the others are object *models* (a boxy
    and a rounded car, a round and a square sign) the way ImageNet has
    "sports car", "street sign", "mountain bike", "picket fence";
  * *no street scene*: the object stands alone on a background of smooth
    colour fields and clutter shapes, so there is no road, sidewalk, sky or
    horizon to learn, nor the demo camera's geometry;
  * *photos from any camera*: each image draws its appearance from wide
    ranges that span both demo domains and beyond (saturation, light,
    colour cast, haze, blur, sensor noise, JPEG), as ImageNet's photos come
    from countless cameras. Nothing is drawn from `target_train` and no
    range is the target style's.
Images never overlap the demo splits: they come from their own generator,
seeded apart (`seed` is namespaced by the caller).
"""

import io

import numpy as np
from PIL import Image
from PIL import ImageFilter

from data_prep.sim2real_render import Canvas, _saturate, _smooth_noise

CATEGORIES = ('boxy_car', 'rounded_car', 'person', 'bicycle', 'round_sign',
              'square_sign', 'pole', 'tree', 'fence', 'facade', 'ring',
              'cross', 'triangle', 'diamond', 'dumbbell', 'arch')

# appearance ranges of the randomised camera: (low, high) per image, and the
# probability that an optical / sensor effect is present at all
SATURATION = (0.5, 1.4)
BRIGHTNESS = (0.6, 1.3)
ILLUMINATION = (0.0, 0.4)
COLOUR_CAST = 0.12
HAZE = (0.0, 0.35)
BLUR = (0.3, 1.2)          # Gaussian sigma in pixels at 64 wide
NOISE = (1.0, 8.0)         # sensor noise std
JPEG_QUALITY = (30, 90)
EFFECT_PROBABILITY = 0.5
CLUTTER = (0, 3)           # small background shapes per image


def _draw(canvas, name, cy, cx, size):
  """Paints object `name` centred at (cy, cx), `size` pixels tall; parts
  painted with dark=True get a dark colour (windows, wheels, trousers)."""
  h = size
  if name in ('boxy_car', 'rounded_car'):
    cw, ch = h * 1.8, h
    x, y = cx - cw / 2, cy + ch / 2
    if name == 'boxy_car':
      canvas.rect(0, y - ch * 0.6, y - ch * 0.1, x, x + cw)
      canvas.rect(0, y - ch, y - ch * 0.55, x + cw * 0.2, x + cw * 0.8)
      canvas.rect(0, y - ch * 0.92, y - ch * 0.62, x + cw * 0.26,
                  x + cw * 0.74, dark=True)
    else:
      canvas.rect(0, y - ch * 0.6, y - ch * 0.12, x, x + cw)
      canvas.ellipse(0, y - ch * 0.6, x + cw / 2, ch * 0.4, cw * 0.33)
      canvas.rect(0, y - ch * 0.85, y - ch * 0.62, x + cw * 0.25,
                  x + cw * 0.75, dark=True)
    for wx in (x + cw * 0.22, x + cw * 0.78):
      canvas.ellipse(0, y - ch * 0.14, wx, ch * 0.14, cw * 0.1, dark=True)
  elif name == 'person':
    y = cy + h / 2
    canvas.ellipse(0, y - h * 0.62, cx, h * 0.22, h * 0.12)
    for dx in (-0.05, 0.05):
      canvas.rect(0, y - h * 0.45, y, cx + h * dx - h * 0.035,
                  cx + h * dx + h * 0.035 + 0.6, dark=True)
    canvas.ellipse(0, y - h * 0.9, cx, h * 0.1, h * 0.08)
  elif name == 'bicycle':
    r = h * 0.3
    y = cy + h * 0.3
    for wx in (cx - 1.3 * r, cx + 1.3 * r):
      canvas.ellipse(0, y - r, wx, r, r, ring=0.45)
    canvas.rect(0, y - 1.5 * r, y - r, cx - 1.3 * r, cx + 1.3 * r)
    canvas.rect(0, y - 2.1 * r, y - r, cx - 0.2 * r, cx + 0.2 * r + 1)
  elif name in ('round_sign', 'square_sign', 'pole'):
    thickness = max(1.5, h * 0.08)
    canvas.rect(0, cy - h / 2, cy + h / 2, cx - thickness / 2,
                cx + thickness / 2)
    r = h * 0.2
    if name == 'round_sign':
      canvas.ellipse(0, cy - h / 2 + r, cx, r, r)
    elif name == 'square_sign':
      canvas.rect(0, cy - h / 2, cy - h / 2 + 2 * r, cx - r, cx + r)
  elif name == 'tree':
    canvas.rect(0, cy, cy + h / 2, cx - h * 0.05, cx + h * 0.05, dark=True)
    canvas.ellipse(0, cy - h * 0.1, cx, h * 0.4, h * 0.3)
  elif name == 'fence':
    canvas.rect(0, cy - h * 0.3, cy + h * 0.3, cx - h * 0.8, cx + h * 0.8)
    for k in range(-3, 4):
      canvas.rect(0, cy - h * 0.3, cy + h * 0.3, cx + k * h * 0.22 - 0.5,
                  cx + k * h * 0.22 + 0.5, dark=True)
  elif name == 'facade':
    canvas.rect(0, cy - h / 2, cy + h / 2, cx - h * 0.4, cx + h * 0.4)
    for row in range(3):
      for col in range(3):
        wy, wx = cy - h * 0.35 + row * h * 0.3, cx - h * 0.28 + col * h * 0.22
        canvas.rect(0, wy, wy + h * 0.15, wx, wx + h * 0.12, dark=True)
  elif name == 'ring':
    canvas.ellipse(0, cy, cx, h / 2, h / 2, ring=0.35)
  elif name == 'cross':
    canvas.rect(0, cy - h / 2, cy + h / 2, cx - h * 0.12, cx + h * 0.12)
    canvas.rect(0, cy - h * 0.12, cy + h * 0.12, cx - h / 2, cx + h / 2)
  elif name in ('triangle', 'diamond'):
    rows = np.arange(int(cy - h / 2), int(cy + h / 2) + 1)[:, None]
    cols = np.arange(int(cx - h / 2), int(cx + h / 2) + 1)[None, :]
    if name == 'triangle':
      mask = np.abs(cols - cx) <= (rows - (cy - h / 2)) / 2
    else:
      mask = np.abs(cols - cx) + np.abs(rows - cy) <= h / 2
    canvas.paint(0, mask, (rows[0, 0], rows[-1, 0] + 1, cols[0, 0],
                           cols[0, -1] + 1))
  elif name == 'dumbbell':
    for dx in (-0.35, 0.35):
      canvas.ellipse(0, cy, cx + dx * h, h * 0.22, h * 0.22)
    canvas.rect(0, cy - h * 0.06, cy + h * 0.06, cx - 0.35 * h, cx + 0.35 * h)
  elif name == 'arch':
    canvas.ellipse(0, cy + h * 0.2, cx, h * 0.5, h * 0.5, ring=0.3)
    canvas.rect(0, cy + h * 0.2, cy + h * 0.7, cx - h, cx + h, dark=True)
  else:
    raise ValueError(f'unknown category {name!r}; known: {CATEGORIES}')


def _colours(rng, canvas):
  """Any colour per object (dark parts dark), as objects in photos have."""
  colours = rng.uniform(20, 235, (len(canvas.objects), 3)).astype(np.float32)
  for index in canvas.dark:
    colours[index] = rng.uniform(15, 50, 3)
  return colours


def _camera(rng, image):
  """Light, colour, haze, then optics and sensor, each drawn per image."""
  size = image.shape[0]
  image *= (1 + rng.uniform(*ILLUMINATION) * (
      _smooth_noise(rng, size, size, 2)[:, :size] - 0.5))[:, :, None]
  image[:] = _saturate(image, rng.uniform(*SATURATION))
  haze = rng.uniform(*HAZE)
  image[:] = image * (1 - haze) + haze * rng.uniform(170, 220)
  image *= rng.uniform(*BRIGHTNESS)
  image *= 1 + rng.uniform(-COLOUR_CAST, COLOUR_CAST, 3)
  pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
  if rng.random() < EFFECT_PROBABILITY:
    pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(*BLUR)))
  pixels = np.asarray(pil, np.float32)
  if rng.random() < EFFECT_PROBABILITY:
    pixels = pixels + rng.normal(0, rng.uniform(*NOISE), pixels.shape)
  pixels = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
  if rng.random() < EFFECT_PROBABILITY:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='JPEG',
                                 quality=int(rng.integers(*JPEG_QUALITY)))
    pixels = np.asarray(Image.open(io.BytesIO(buffer.getvalue()))
                        .convert('RGB'))
  return pixels


def render(seed, size: int = 64):
  """(image uint8 [size, size, 3], category index) for one pretraining
  image; the same seed always gives the same pair."""
  rng = np.random.default_rng(seed)
  category = int(rng.integers(len(CATEGORIES)))
  canvas = Canvas(size, size * 2)  # Canvas is H x 2H; the left half is used
  canvas.label[:] = 0
  for _ in range(rng.integers(*CLUTTER, endpoint=True)):
    _draw(canvas, CATEGORIES[rng.integers(len(CATEGORIES))],
          rng.uniform(0, size), rng.uniform(0, size),
          size * rng.uniform(0.15, 0.3))
  _draw(canvas, CATEGORIES[category],
        size / 2 + rng.uniform(-0.1, 0.1) * size,
        size / 2 + rng.uniform(-0.1, 0.1) * size,
        size * rng.uniform(0.4, 0.75))
  background = [rng.uniform(20, 235, 3) for _ in range(2)]
  blend = _smooth_noise(rng, size, 2 * size, 3)[:, :, None]
  image = background[0] * blend + background[1] * (1 - blend)
  painted = canvas.obj > 0
  image[painted] = _colours(rng, canvas)[canvas.obj[painted]]
  grain = rng.standard_normal(image.shape[:2])[:, :, None]
  blotches = _smooth_noise(rng, size, 2 * size, 6)[:, :, None] - 0.5
  image = image + rng.uniform(0, 12) * grain + rng.uniform(0, 40) * blotches
  image = np.ascontiguousarray(image[:, :size], np.float32)
  return _camera(rng, image), category
