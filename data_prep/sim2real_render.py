"""Procedural street scenes for the built-in sim-to-real demo dataset.

`render(seed_sequence, domain, height, width)` returns `(image uint8 [H, W, 3],
label uint8 [H, W])` with labels in the 19-class Cityscapes trainId space
(255 = ignore), deterministically from the seed sequence.

One scene grammar and one appearance model (materials, per-object colours,
textures, windows, lane marks, lighting, shadows), two domains that differ
the way a game engine's frames differ from a car camera's (GTA5 / SYNTHIA
-> Cityscapes), each difference a field of `Style`:
  * appearance: the "synthetic" domain (source) is a renderer's: saturated
    game materials, hard shadows, strong time-of-day lighting, perfectly
    sharp and noiseless pixels. The "real" domain (target) is a camera's:
    muted materials (other pavements, facades, road surfaces), overcast
    light with soft shadows, haze, a colour cast, lens blur, sensor noise
    and JPEG compression.
  * camera: a higher camera for the game (horizon at 36-46 % of the
    height), a lower and wider one with the ego-vehicle hood (label 255)
    for the car camera.
  * shapes: the same object kinds in both, drawn from other models (boxy
    cars in the game, rounded ones on the street).
  * class frequencies: the game has more cars, the street more people,
    bicycles and poles.
Both domains vary colour within a class (cars and clothes of every colour,
facades of many materials), so that neither is solvable by colour alone:
what transfers is shape and context, as on real data.

Object sizes are chosen to be resolvable at the demo's training size (64x128
from the 128x256 renders, logits at stride 8): poles, signs and bicycles are
a few pixels wide there, like their counterparts at Cityscapes' 1024-pixel
training width, rather than sub-pixel.

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


class Style(NamedTuple):
  """Everything that differs between the two domains."""
  camera: Camera
  frequencies: Frequencies
  car_model: str          # 'boxy' | 'rounded'
  materials: dict         # class -> tuple of base RGB colours (one per image)
  material_jitter: float  # +- per object around the image's material
  texture: float          # gain of the per-class texture amplitudes
  saturation: tuple       # (low, high) per-image saturation factor
  shadow: tuple           # (low, high) brightness factor inside shadows
  illumination: float     # amplitude of smooth light variation over the image
  brightness: tuple       # (low, high) per-image exposure
  colour_cast: float      # +- per-channel gain
  haze: tuple             # (low, high) haze density at the horizon
  blur: tuple             # (low, high) Gaussian sigma in pixels at 256 wide
  noise: tuple            # (low, high) sensor noise std
  jpeg_quality: tuple     # (low, high); () = lossless


STYLES = {
    # A game engine: saturated materials, hard shadows, clean pixels.
    'synthetic': Style(
        camera=Camera((0.36, 0.46), (0.35, 0.5), False),
        frequencies=Frequencies((2, 6), (1, 3), (0, 2), (2, 4), (1, 3),
                                (0, 2)),
        car_model='boxy',
        materials={
            ROAD: ((70, 70, 75), (95, 90, 100), (55, 55, 60), (125, 120, 115)),
            SIDEWALK: ((190, 185, 175), (200, 120, 110), (150, 150, 160),
                       (105, 105, 110), (140, 125, 95)),
            FENCE: ((160, 130, 100), (120, 120, 130)),
            POLE: ((110, 110, 115), (60, 90, 60)),
            SIGN: ((220, 200, 0), (230, 40, 40), (40, 80, 220)),
            SKY: ((90, 160, 235), (120, 180, 240), (250, 170, 120)),
        },
        material_jitter=25.0, texture=2.0, saturation=(1.0, 1.4), shadow=(0.4, 0.6),
        illumination=0.4,
        brightness=(0.75, 1.3), colour_cast=0.06, haze=(0.0, 0.15),
        blur=(0.0, 0.0), noise=(0.0, 1.5), jpeg_quality=()),
    # A car camera: muted materials, overcast light, optics and sensor.
    'real': Style(
        camera=Camera((0.48, 0.56), (0.45, 0.6), True),
        frequencies=Frequencies((1, 4), (2, 5), (1, 3), (3, 6), (2, 4),
                                (1, 2)),
        car_model='rounded',
        materials={
            ROAD: ((96, 94, 98), (120, 118, 115), (80, 80, 84)),
            SIDEWALK: ((160, 150, 135), (150, 75, 60), (120, 120, 125),
                       (185, 180, 170)),
            FENCE: ((120, 110, 80), (90, 95, 90)),
            POLE: ((70, 75, 70), (140, 140, 135)),
            SIGN: ((30, 90, 200), (200, 40, 40), (230, 230, 230)),
            SKY: ((200, 215, 230), (150, 185, 225), (215, 215, 210),
                  (235, 190, 150)),
        },
        material_jitter=15.0, texture=1.0, saturation=(0.55, 0.9), shadow=(0.65, 0.85),
        illumination=0.2,
        brightness=(0.6, 1.15), colour_cast=0.12, haze=(0.05, 0.35),
        blur=(0.5, 1.2), noise=(3.0, 8.0), jpeg_quality=(40, 75)),
}


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


def _layout(rng, style, canvas):
  """Paints the scene grammar; returns the horizon row and the road edges."""
  h, w = canvas.height, canvas.width
  cam, freq = style.camera, style.frequencies
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
                   h * rng.uniform(0.07, 0.17), w * rng.uniform(0.05, 0.11))
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
    y = horizon + (h - horizon) * rng.uniform(0.05, 0.35)
    s = depth(y)
    x0 = on_sidewalk(y)
    length, height = w * rng.uniform(0.12, 0.3) * (0.5 + s), h * 0.16 * s + 5

    def fence(y=y, x0=x0, length=length, height=height):
      canvas.rect(FENCE, y - height, y, x0, x0 + length)
    objects.append((y, fence))

  for _ in range(rng.integers(*freq.poles, endpoint=True)):
    y = horizon + (h - horizon) * rng.uniform(0.05, 0.6)
    s, x = depth(y), on_sidewalk(y)
    top = y - h * (0.3 + 0.4 * s)
    has_sign = rng.random() < 0.7
    sign_size = max(h * 0.035, w * 0.025 * (0.5 + 2 * s))
    round_sign = rng.random() < 0.5

    def pole(y=y, x=x, top=top, s=s, has_sign=has_sign, size=sign_size,
             round_sign=round_sign):
      thickness = max(h * 0.025, h * 0.06 * s)
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
    cw = w * 0.25 * s + 6
    x = rng.uniform(l, max(r - cw, l + 1))
    ch = cw * rng.uniform(0.45, 0.6)

    def car(y=y, x=x, cw=cw, ch=ch):
      if style.car_model == 'boxy':  # body and cabin boxes
        canvas.rect(CAR, y - ch * 0.6, y - ch * 0.1, x, x + cw)
        canvas.rect(CAR, y - ch, y - ch * 0.55, x + cw * 0.2, x + cw * 0.8)
        canvas.rect(CAR, y - ch * 0.92, y - ch * 0.62, x + cw * 0.26,
                    x + cw * 0.74, dark=True)
      else:  # rounded cabin
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
    ph = h * (0.1 + 0.4 * s)

    def person(y=y, x=x, ph=ph):  # torso, two legs, a head
      canvas.ellipse(PERSON, y - ph * 0.62, x, ph * 0.22, ph * 0.12)
      for dx in (-0.05, 0.05):
        canvas.rect(PERSON, y - ph * 0.45, y, x + ph * dx - ph * 0.035,
                    x + ph * dx + ph * 0.035 + 0.6, dark=True)
      canvas.ellipse(PERSON, y - ph * 0.9, x, ph * 0.1, ph * 0.08)
    objects.append((y, person))

  for _ in range(rng.integers(*freq.bicycles, endpoint=True)):
    y = horizon + (h - horizon) * rng.uniform(0.1, 0.8)
    s = depth(y)
    l, r = road_edges(y)
    x = rng.uniform(max(l - 0.1 * w, 0), min(l + 0.15 * w, w))
    radius = h * (0.04 + 0.1 * s)

    def bicycle(y=y, x=x, radius=radius):
      for cx in (x - 1.3 * radius, x + 1.3 * radius):
        canvas.ellipse(BICYCLE, y - radius, cx, radius, radius, ring=0.45)
      canvas.rect(BICYCLE, y - 1.5 * radius, y - 1.0 * radius,
                  x - 1.3 * radius, x + 1.3 * radius)
      canvas.rect(BICYCLE, y - 2.1 * radius, y - radius, x - 0.2 * radius,
                  x + 0.2 * radius + 1)
    objects.append((y, bicycle))

  for _, draw in sorted(objects, key=lambda o: o[0]):
    draw()
  if cam.hood:
    hood_top = h * rng.uniform(0.9, 0.94)
    curve = hood_top + (h * 0.04) * ((canvas.cols - w / 2) / (w / 2)) ** 2
    canvas.paint(IGNORE, rows >= curve)
  return horizon, road_edges


def _object_colours(rng, canvas, style):
  """One colour per painted object: per-image materials for the ground, sky,
  fences, poles and signs (jittered per object); facades, foliage, cars,
  clothes and bicycles of any colour, drawn per object."""
  colours = np.zeros((len(canvas.objects), 3), np.float32)
  scene = {cls: np.asarray(options[rng.integers(len(options))], np.float32)
           for cls, options in style.materials.items()}
  jitter = style.material_jitter
  for i, cls in enumerate(canvas.objects):
    if cls == IGNORE:
      colours[i] = (20, 20, 22)
    elif i in canvas.dark:
      colours[i] = rng.uniform(15, 50, 3)
    elif cls in (CAR, PERSON):
      colours[i] = rng.uniform(20, 235, 3)
    elif cls == BICYCLE:
      colours[i] = rng.uniform(20, 160, 3)
    elif cls == BUILDING:
      colours[i] = rng.uniform(60, 215, 3)
    elif cls == VEGETATION:
      colours[i] = np.asarray((rng.uniform(30, 140), rng.uniform(70, 150),
                               rng.uniform(15, 60)))
    else:
      colours[i] = scene[cls] + rng.uniform(-jitter, jitter, 3)
  return colours


def _smooth_noise(rng, height, width, cells):
  grid = rng.random((cells, cells * 2)).astype(np.float32)
  image = Image.fromarray(grid, mode='F').resize((width, height),
                                                 Image.BILINEAR)
  return np.asarray(image)


def _saturate(image, factor):
  grey = image.mean(-1, keepdims=True)
  return grey + factor * (image - grey)


def _appearance(rng, style, canvas, image, horizon, road_edges):
  """Textures, windows, lane marks, lighting, shadows, haze, then the
  optics and sensor of `style`; float RGB in, uint8 RGB out."""
  h, w = canvas.height, canvas.width
  label = canvas.label
  rows, cols = canvas.rows, canvas.cols
  # per-class textures: low-frequency blotches and fine grain
  blotches = _smooth_noise(rng, h, w, 8) - 0.5
  grain = rng.standard_normal((h, w)).astype(np.float32)
  strength = {ROAD: (30, 10), SIDEWALK: (25, 12), BUILDING: (40, 8),
              VEGETATION: (50, 30), SKY: (20, 2), FENCE: (10, 10),
              CAR: (10, 6), PERSON: (15, 8), POLE: (5, 6), SIGN: (5, 6),
              BICYCLE: (5, 6)}
  for cls, (low, fine) in strength.items():
    m = label == cls
    image[m] += style.texture * (low * blotches[m] + fine * grain[m])[:, None]
  # windows on buildings, slats on fences, lane marks on the road
  windows = (label == BUILDING) & ((rows // 4) % 3 == 1) & ((cols // 3) % 3 == 1)
  image[windows] *= rng.uniform(0.4, 0.7)
  slats = (label == FENCE) & ((cols % 4 == 0) | (rows % 4 == 0))
  image[slats] *= 0.6
  left, right = road_edges(rows)
  centre = (left + right) / 2
  lane = ((label == ROAD) & (np.abs(cols - centre) < 0.7 + 0.01 * (rows - horizon))
          & ((rows // 5) % 2 == 0))
  image[lane] = (225, 225, 215)
  # sky gradient
  sky = label == SKY
  image[sky] *= (0.85 + 0.3 * (rows / h) * np.ones((1, w)))[sky][:, None]
  image[:] = _saturate(image, rng.uniform(*style.saturation))
  # cast shadows: a diagonal band across the ground and under the cars
  ground = (label == ROAD) | (label == SIDEWALK)
  shadow = rng.uniform(*style.shadow)
  slope, offset = rng.uniform(-1, 1), rng.uniform(0, w)
  band = np.abs(cols - (offset + slope * (rows - horizon))) < w * rng.uniform(
      0.05, 0.2)
  image[ground & band] *= shadow
  car_rows = (label == CAR)
  below_car = np.zeros_like(car_rows)
  below_car[2:] = car_rows[:-2]
  image[below_car & ground] *= shadow * 0.8
  # haze: thicker towards the horizon
  haze = rng.uniform(*style.haze)
  distance = np.clip(1 - np.abs(rows - horizon) / (0.5 * h), 0, 1)
  image[:] = image * (1 - haze * distance[:, :, None]) + (
      haze * distance[:, :, None] * rng.uniform(170, 220))
  # lighting: uneven light, exposure, colour cast, vertical gradient
  light = _smooth_noise(rng, h, w, 4) - 0.5
  image *= (1 + style.illumination * light)[:, :, None]
  image *= rng.uniform(*style.brightness)
  image *= 1 + rng.uniform(-style.colour_cast, style.colour_cast, 3)
  image *= (1.1 - 0.25 * rows / h)[:, :, None]
  pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
  sigma = rng.uniform(*style.blur) * w / 256
  if sigma > 0:
    pil = pil.filter(ImageFilter.GaussianBlur(sigma))
  noisy = np.asarray(pil, np.float32) + rng.normal(0, rng.uniform(
      *style.noise), (h, w, 3))
  pixels = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
  if not style.jpeg_quality:
    return pixels
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=int(
      rng.integers(*style.jpeg_quality)))
  return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert('RGB'))


def render(seed, domain: str, height: int = 128, width: int = 256,
           style: Style | None = None):
  """(image uint8 [H, W, 3], label uint8 [H, W]) for one scene.

  `seed` is anything `numpy.random.default_rng` takes (an int or a sequence
  of ints); the same seed always gives the same arrays. `style` replaces
  `STYLES[domain]` (for probes of single factors of the shift)."""
  if domain not in DOMAINS:
    raise ValueError(f'domain must be one of {DOMAINS}, got {domain!r}')
  style = STYLES[domain] if style is None else style
  rng = np.random.default_rng(seed)
  canvas = Canvas(height, width)
  horizon, road_edges = _layout(rng, style, canvas)
  image = _object_colours(rng, canvas, style)[canvas.obj]
  image = _appearance(rng, style, canvas, image, horizon, road_edges)
  return image, canvas.label.copy()
