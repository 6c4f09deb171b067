"""Procedural street scenes for the built-in sim-to-real demo dataset.

`render(seed_sequence, domain, height, width)` returns `(image uint8 [H, W, 3],
label uint8 [H, W])` with labels in the 19-class Cityscapes trainId space
(255 = ignore), deterministically from the seed sequence.

One scene grammar, two domains:
  * "synthetic" (source): flat-shaded classes, sharp edges, clean colours,
    simple shapes (box cars, ellipse people), a high camera (horizon at
    32-40 % of the height), many cars.
  * "real" (target): the same grammar rendered with another appearance
    model — a shifted palette, random car and clothing colours, per-image
    materials (road, pavement, sky mood), facade and foliage colours,
    per-class textures, window grids and lane marks, haze, lighting and
    colour cast, cast shadows, blur, sensor noise, JPEG artefacts — other
    shapes (rounded cars with windows and wheels, people with legs), a
    lower, wider camera (horizon at 52-60 %, wider road, an ego-vehicle hood
    labelled 255) and shifted class frequencies (more people, bicycles and
    poles, fewer cars).

Classes used (trainIds): road 0, sidewalk 1, building 2, fence 4, pole 5,
traffic sign 7, vegetation 8, sky 10, person 11, car 13, bicycle 18 — the
small / rare ones being fence, pole, sign, person and bicycle.
"""

import io
from typing import NamedTuple

import numpy as np
from PIL import Image
from PIL import ImageFilter

IGNORE = 255
ROAD, SIDEWALK, BUILDING, FENCE, POLE, SIGN = 0, 1, 2, 4, 5, 7
VEGETATION, SKY, PERSON, CAR, BICYCLE = 8, 10, 11, 13, 18
DEMO_CLASSES = (ROAD, SIDEWALK, BUILDING, FENCE, POLE, SIGN, VEGETATION, SKY,
                PERSON, CAR, BICYCLE)
DOMAINS = ('synthetic', 'real')


class Camera(NamedTuple):
  horizon: tuple       # (low, high) fraction of the height
  road_half_width: tuple  # half-width of the road at the bottom / W
  hood: bool           # ego-vehicle hood at the bottom (label 255)


class Frequencies(NamedTuple):  # (low, high) object counts per image
  cars: tuple
  persons: tuple
  bicycles: tuple
  poles: tuple
  trees: tuple
  fences: tuple


CAMERAS = {'synthetic': Camera((0.32, 0.40), (0.35, 0.45), False),
           'real': Camera((0.52, 0.60), (0.5, 0.65), True)}
FREQUENCIES = {
    'synthetic': Frequencies((3, 7), (0, 3), (0, 1), (1, 4), (1, 3), (0, 1)),
    'real': Frequencies((1, 4), (2, 7), (1, 3), (3, 7), (2, 5), (1, 2)),
}

# Flat colours of the synthetic domain (clean, saturated).
SYNTHETIC_PALETTE = {
    ROAD: (128, 64, 128), SIDEWALK: (244, 35, 232), BUILDING: (70, 70, 70),
    FENCE: (190, 153, 153), POLE: (153, 153, 153), SIGN: (220, 220, 0),
    VEGETATION: (107, 142, 35), SKY: (70, 130, 180), PERSON: (220, 20, 60),
    CAR: (0, 0, 142), BICYCLE: (119, 11, 32)}
# Base colours of the real-like domain (a different palette altogether).
REAL_PALETTE = {
    ROAD: (96, 94, 98), SIDEWALK: (160, 150, 135), BUILDING: (150, 120, 95),
    FENCE: (120, 110, 80), POLE: (70, 75, 70), SIGN: (30, 90, 200),
    VEGETATION: (60, 95, 45), SKY: (200, 215, 230), PERSON: (90, 80, 70),
    CAR: (150, 150, 150), BICYCLE: (40, 40, 40)}
# Object classes whose colour is drawn at random per object in the real domain.
RANDOM_COLOUR_CLASSES = (CAR, PERSON, BICYCLE)


class Canvas:
  """Label map plus per-pixel object index; objects get their colours later."""

  def __init__(self, height, width):
    self.height, self.width = height, width
    self.label = np.full((height, width), SKY, np.uint8)
    self.obj = np.zeros((height, width), np.int32)
    self.objects = [SKY]  # object index -> class
    self.dark = set()     # indices of objects painted in a dark colour
    self.rows = np.arange(height)[:, None]
    self.cols = np.arange(width)[None, :]

  def paint(self, cls, mask, box=None, dark=False):
    """Paints `mask` (full-size bool, or bool over `box` = (y0, y1, x0, x1));
    `dark` parts (windows, wheels, trousers) get a dark colour."""
    index = len(self.objects)
    self.objects.append(cls)
    if dark:
      self.dark.add(index)
    if box is None:
      self.label[mask] = cls
      self.obj[mask] = index
      return
    y0, y1, x0, x1 = (max(0, box[0]), min(self.height, box[1]),
                      max(0, box[2]), min(self.width, box[3]))
    if y0 >= y1 or x0 >= x1:
      return
    sub = mask[y0 - box[0]:y1 - box[0], x0 - box[2]:x1 - box[2]]
    self.label[y0:y1, x0:x1][sub] = cls
    self.obj[y0:y1, x0:x1][sub] = index

  def rect(self, cls, y0, y1, x0, x1, dark=False):
    y0, y1, x0, x1 = (int(round(v)) for v in (y0, y1, x0, x1))
    self.paint(cls, np.ones((max(y1 - y0, 0), max(x1 - x0, 0)), bool),
               (y0, y1, x0, x1), dark)

  def ellipse(self, cls, cy, cx, ry, rx, ring=0.0, dark=False):
    ry, rx = max(ry, 0.6), max(rx, 0.6)
    y0, y1 = int(np.floor(cy - ry)), int(np.ceil(cy + ry)) + 1
    x0, x1 = int(np.floor(cx - rx)), int(np.ceil(cx + rx)) + 1
    yy = (np.arange(y0, y1)[:, None] - cy) / ry
    xx = (np.arange(x0, x1)[None, :] - cx) / rx
    r = yy ** 2 + xx ** 2
    mask = r <= 1.0
    if ring:
      mask &= r >= (1.0 - ring) ** 2
    self.paint(cls, mask, (y0, y1, x0, x1), dark)


def _layout(rng, domain, canvas):
  """Paints the scene grammar; returns the horizon row and the road edges."""
  h, w = canvas.height, canvas.width
  cam, freq = CAMERAS[domain], FREQUENCIES[domain]
  horizon = int(h * rng.uniform(*cam.horizon))
  vanish = w * rng.uniform(0.4, 0.6)
  half = w * rng.uniform(*cam.road_half_width)

  def road_edges(y):
    t = (y - horizon) / max(h - horizon, 1)
    return vanish - t * half, vanish + t * half

  # buildings: blocks along the horizon, with gaps of sky
  x = rng.uniform(-0.05, 0.05) * w
  while x < w:
    bw = w * rng.uniform(0.08, 0.25)
    if rng.random() < 0.85:
      top = horizon - h * rng.uniform(0.12, 0.38)
      canvas.rect(BUILDING, top, horizon + 2, x, x + bw)
    x += bw
  # trees behind the street furniture
  for _ in range(rng.integers(*freq.trees, endpoint=True)):
    cx = w * rng.random()
    canvas.ellipse(VEGETATION, horizon - h * rng.uniform(0.0, 0.15), cx,
                   h * rng.uniform(0.06, 0.16), w * rng.uniform(0.04, 0.1))
  # ground: sidewalk everywhere below the horizon, then the road trapezoid
  rows = canvas.rows
  below = (rows >= horizon) & np.ones((1, w), bool)
  canvas.paint(SIDEWALK, below)
  left, right = road_edges(rows)
  canvas.paint(ROAD, below & (canvas.cols >= left) & (canvas.cols <= right))

  objects = []  # (bottom row, draw function), painted far to near

  def on_sidewalk(y):
    l, r = road_edges(y)
    side = rng.random() < 0.5
    lo, hi = (max(l - 0.3 * w, 0), max(l - 2, 1)) if side else (
        min(r + 2, w - 1), min(r + 0.3 * w, w))
    return rng.uniform(lo, hi) if hi > lo else rng.uniform(0, w)

  def depth(y):
    return max((y - horizon) / max(h - horizon, 1), 0.05)

  for _ in range(rng.integers(*freq.fences, endpoint=True)):
    y = horizon + (h - horizon) * rng.uniform(0.05, 0.3)
    s = depth(y)
    x0 = on_sidewalk(y)
    length, height = w * rng.uniform(0.1, 0.3) * (0.5 + s), h * 0.12 * s + 3

    def fence(y=y, x0=x0, length=length, height=height):
      yy, xx = np.mgrid[0:int(height), 0:int(length)]
      lattice = (yy % 3 == 0) | (xx % 4 == 0)
      canvas.paint(FENCE, lattice, (int(y - height), int(y - height) +
                                    int(height), int(x0), int(x0) +
                                    int(length)))
    objects.append((y, fence))

  for _ in range(rng.integers(*freq.poles, endpoint=True)):
    y = horizon + (h - horizon) * rng.uniform(0.05, 0.6)
    s, x = depth(y), on_sidewalk(y)
    top = y - h * (0.3 + 0.4 * s)
    has_sign = rng.random() < 0.6
    sign_size = max(2.0, w * 0.02 * (0.5 + 2 * s))
    round_sign = rng.random() < 0.5

    def pole(y=y, x=x, top=top, s=s, has_sign=has_sign, size=sign_size,
             round_sign=round_sign):
      thickness = max(1.0, 3 * s)
      canvas.rect(POLE, top, y, x - thickness / 2, x + thickness / 2)
      if has_sign:
        if round_sign:
          canvas.ellipse(SIGN, top + size, x, size, size)
        else:
          canvas.rect(SIGN, top, top + 2 * size, x - size, x + size)
    objects.append((y, pole))

  for _ in range(rng.integers(*freq.cars, endpoint=True)):
    y = horizon + (h - horizon) * rng.uniform(0.05, 0.9)
    l, r = road_edges(y)
    s = depth(y)
    cw = w * 0.25 * s + 4
    x = rng.uniform(l, max(r - cw, l + 1))
    ch = cw * rng.uniform(0.45, 0.6)

    def car(y=y, x=x, cw=cw, ch=ch):
      if domain == 'synthetic':  # two boxes
        canvas.rect(CAR, y - ch * 0.6, y, x, x + cw)
        canvas.rect(CAR, y - ch, y - ch * 0.55, x + cw * 0.2, x + cw * 0.8)
        return
      # rounded cabin, dark windows and wheels
      canvas.rect(CAR, y - ch * 0.6, y - ch * 0.12, x, x + cw)
      canvas.ellipse(CAR, y - ch * 0.6, x + cw / 2, ch * 0.4, cw * 0.33)
      canvas.rect(CAR, y - ch * 0.85, y - ch * 0.62, x + cw * 0.25,
                  x + cw * 0.75, dark=True)
      for cx in (x + cw * 0.22, x + cw * 0.78):
        canvas.ellipse(CAR, y - ch * 0.14, cx, ch * 0.14, cw * 0.1, dark=True)
    objects.append((y, car))

  for _ in range(rng.integers(*freq.persons, endpoint=True)):
    y = horizon + (h - horizon) * rng.uniform(0.05, 0.8)
    s = depth(y)
    x = on_sidewalk(y) if rng.random() < 0.8 else rng.uniform(0, w)
    ph = h * (0.08 + 0.4 * s)

    def person(y=y, x=x, ph=ph):
      if domain == 'synthetic':  # a body and a head
        canvas.ellipse(PERSON, y - ph * 0.45, x, ph * 0.4, ph * 0.12)
      else:  # torso, two legs, a head
        canvas.ellipse(PERSON, y - ph * 0.62, x, ph * 0.22, ph * 0.11)
        for dx in (-0.05, 0.05):
          canvas.rect(PERSON, y - ph * 0.45, y, x + ph * dx - ph * 0.03,
                      x + ph * dx + ph * 0.03 + 0.6, dark=True)
      canvas.ellipse(PERSON, y - ph * 0.9, x, ph * 0.1, ph * 0.08)
    objects.append((y, person))

  for _ in range(rng.integers(*freq.bicycles, endpoint=True)):
    y = horizon + (h - horizon) * rng.uniform(0.1, 0.8)
    s = depth(y)
    l, r = road_edges(y)
    x = rng.uniform(max(l - 0.1 * w, 0), min(l + 0.15 * w, w))
    radius = h * (0.03 + 0.09 * s)

    def bicycle(y=y, x=x, radius=radius):
      for cx in (x - 1.3 * radius, x + 1.3 * radius):
        canvas.ellipse(BICYCLE, y - radius, cx, radius, radius, ring=0.35)
      canvas.rect(BICYCLE, y - 1.4 * radius, y - 1.1 * radius,
                  x - 1.3 * radius, x + 1.3 * radius)
      canvas.rect(BICYCLE, y - 2.1 * radius, y - radius, x - 0.15 * radius,
                  x + 0.15 * radius + 1)
    objects.append((y, bicycle))

  for _, draw in sorted(objects, key=lambda o: o[0]):
    draw()
  if cam.hood:
    hood_top = h * rng.uniform(0.9, 0.94)
    curve = hood_top + (h * 0.04) * ((canvas.cols - w / 2) / (w / 2)) ** 2
    canvas.paint(IGNORE, rows >= curve)
  return horizon, road_edges


# Per-image material choices of the real-like domain (RGB).
SIDEWALK_MATERIALS = ((160, 150, 135), (150, 75, 60), (120, 120, 125),
                      (185, 180, 170))
SKY_MOODS = ((200, 215, 230), (150, 185, 225), (215, 215, 210),
             (235, 190, 150))


def _object_colours(rng, canvas, domain):
  """One colour per painted object. Synthetic: the class's flat colour,
  barely jittered. Real-like: per-image materials (road brightness, pavement,
  sky mood), per-object facade and foliage colours, random car and clothing
  colours."""
  colours = np.zeros((len(canvas.objects), 3), np.float32)
  if domain == 'synthetic':
    for i, cls in enumerate(canvas.objects):
      colours[i] = (np.asarray(SYNTHETIC_PALETTE.get(cls, (20, 20, 22)))
                    + rng.uniform(-8, 8, 3))
    return colours
  scene = dict(REAL_PALETTE)
  scene[ROAD] = np.full(3, rng.uniform(55, 140)) + rng.uniform(-6, 6, 3)
  scene[SIDEWALK] = SIDEWALK_MATERIALS[rng.integers(len(SIDEWALK_MATERIALS))]
  scene[SKY] = SKY_MOODS[rng.integers(len(SKY_MOODS))]
  for i, cls in enumerate(canvas.objects):
    if cls == IGNORE:
      colours[i] = (20, 20, 22)
    elif i in canvas.dark:
      colours[i] = rng.uniform(15, 45, 3)
    elif cls in RANDOM_COLOUR_CLASSES:
      colours[i] = rng.uniform(20, 235, 3)
    elif cls == BUILDING:
      colours[i] = rng.uniform(70, 210, 3)
    elif cls == VEGETATION:
      colours[i] = np.asarray((rng.uniform(40, 140), rng.uniform(70, 130),
                               rng.uniform(20, 50)))
    else:
      colours[i] = np.asarray(scene[cls]) + rng.uniform(-20, 20, 3)
  return colours


def _smooth_noise(rng, height, width, cells):
  grid = rng.random((cells, cells * 2)).astype(np.float32)
  image = Image.fromarray(grid, mode='F').resize((width, height),
                                                 Image.BILINEAR)
  return np.asarray(image)


def _real_appearance(rng, canvas, image, horizon, road_edges):
  h, w = canvas.height, canvas.width
  label = canvas.label
  rows, cols = canvas.rows, canvas.cols
  # per-class textures: low-frequency blotches and fine grain
  blotches = _smooth_noise(rng, h, w, 8) - 0.5
  grain = rng.standard_normal((h, w)).astype(np.float32)
  strength = {ROAD: (30, 10), SIDEWALK: (25, 12), BUILDING: (40, 8),
              VEGETATION: (50, 30), SKY: (20, 2), FENCE: (10, 10),
              CAR: (10, 4), PERSON: (15, 6)}
  for cls, (low, fine) in strength.items():
    m = label == cls
    image[m] += (low * blotches[m] + fine * grain[m])[:, None]
  # windows on buildings, lane marks on the road
  windows = (label == BUILDING) & ((rows // 4) % 3 == 1) & ((cols // 3) % 3 == 1)
  image[windows] *= 0.55
  left, right = road_edges(rows)
  centre = (left + right) / 2
  lane = ((label == ROAD) & (np.abs(cols - centre) < 0.7 + 0.01 * (rows - horizon))
          & ((rows // 5) % 2 == 0))
  image[lane] = (225, 225, 215)
  # sky gradient
  sky = label == SKY
  image[sky] *= (0.85 + 0.3 * (rows / h) * np.ones((1, w)))[sky][:, None]
  # cast shadows: a diagonal band across the ground and under the cars
  ground = (label == ROAD) | (label == SIDEWALK)
  slope, offset = rng.uniform(-1, 1), rng.uniform(0, w)
  band = np.abs(cols - (offset + slope * (rows - horizon))) < w * rng.uniform(
      0.05, 0.2)
  image[ground & band] *= 0.6
  car_rows = (label == CAR)
  below_car = np.zeros_like(car_rows)
  below_car[2:] = car_rows[:-2]
  image[below_car & ground] *= 0.45
  # haze: thicker towards the horizon
  haze = rng.uniform(0.0, 0.45)
  distance = np.clip(1 - np.abs(rows - horizon) / (0.5 * h), 0, 1)
  image[:] = image * (1 - haze * distance[:, :, None]) + (
      haze * distance[:, :, None] * rng.uniform(170, 220))
  # lighting: brightness, colour cast, vertical gradient
  image *= rng.uniform(0.6, 1.25)
  image *= rng.uniform(0.85, 1.15, 3)
  image *= (1.1 - 0.25 * rows / h)[:, :, None]
  pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
  pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.6)))
  noisy = np.asarray(pil, np.float32) + rng.normal(0, rng.uniform(4, 12),
                                                   (h, w, 3))
  pil = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
  buffer = io.BytesIO()
  pil.save(buffer, format='JPEG', quality=int(rng.integers(25, 60)))
  return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert('RGB'))


def render(seed, domain: str, height: int = 128, width: int = 256):
  """(image uint8 [H, W, 3], label uint8 [H, W]) for one scene.

  `seed` is anything `numpy.random.default_rng` takes (an int or a sequence
  of ints); the same seed always gives the same arrays."""
  if domain not in DOMAINS:
    raise ValueError(f'domain must be one of {DOMAINS}, got {domain!r}')
  rng = np.random.default_rng(seed)
  canvas = Canvas(height, width)
  horizon, road_edges = _layout(rng, domain, canvas)
  image = _object_colours(rng, canvas, domain)[canvas.obj]
  if domain == 'synthetic':
    image = np.clip(image, 0, 255).astype(np.uint8)
  else:
    image = _real_appearance(rng, canvas, image, horizon, road_edges)
  return image, canvas.label.copy()
