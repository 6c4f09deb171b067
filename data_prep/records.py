"""The record format every builder writes (SPEC §5)."""

import tensorflow_datasets as tfds


def record_features() -> tfds.features.FeaturesDict:
  """`image` uint8 [H, W, 3] PNG, `label` uint8 [H, W, 1] trainIds PNG
  (255 = ignore), `image_id` (the source file's stem)."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3),
                                   encoding_format='png'),
      'label': tfds.features.Image(shape=(None, None, 1),
                                   encoding_format='png'),
      'image_id': tfds.features.Text(),
  })
