"""Bytes <-> arrays of the records: PNG encoding (deterministic, what every
builder and the pseudo-label store write) and record text fields."""

import io

import numpy as np
from PIL import Image


def encode_png(array: np.ndarray) -> bytes:
  """Deterministic PNG bytes of a uint8 [H, W] or [H, W, 3] array."""
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG', compress_level=6)
  return buffer.getvalue()


def as_str(value) -> str:
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, np.ndarray):
    return as_str(value.item())
  return str(value)
