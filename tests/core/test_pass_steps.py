"""Test-time augmentation: flipped passes are flipped back, scaled passes
are brought to the output size, probabilities are averaged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spcl_jax.core import pass_steps


class _RampModel:
  """Stand-in segmenter (3 classes): logits = image + a horizontal ramp,
  so a flipped pass differs from an unflipped one."""
  num_classes = 3

  def apply(self, variables, images, train):
    del variables, train
    ramp = jnp.linspace(0.0, 2.0, images.shape[2])[:, None] * jnp.array(
        [1.0, -1.0, 0.0])
    return {'logits': images + ramp}


def test_flip_average_undoes_the_flip():
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 6, 3)),
                       jnp.float32)
  model = _RampModel()
  got = pass_steps.averaged_probabilities(model, {}, images, (4, 6),
                                          flip=True)
  ramp = np.linspace(0.0, 2.0, 6)[:, None] * np.array([1.0, -1.0, 0.0])
  expected = (jax.nn.softmax(images + ramp) +
              jax.nn.softmax(images + ramp[::-1])) / 2
  np.testing.assert_allclose(got, expected, atol=1e-6)


def test_scaled_passes_land_on_the_output_grid():
  # constant image: at half size the ramp, upsampled with aligned corners,
  # is the full-size ramp again, so every scale gives the same probabilities
  images = jnp.full((1, 8, 16, 3), 0.3, jnp.float32)
  model = _RampModel()
  single = pass_steps.averaged_probabilities(model, {}, images, (8, 16))
  both = pass_steps.averaged_probabilities(model, {}, images, (8, 16),
                                           scales=(0.5, 1.0))
  np.testing.assert_allclose(both, single, atol=1e-5)
  classes = pass_steps.make_predict_step(model, (0.5, 1.0), True)(
      {}, images, (8, 16))
  assert classes.dtype == jnp.uint8 and classes.shape == (1, 8, 16)
  with pytest.raises(ValueError, match='positive'):
    pass_steps.check_scales([1.0, 0.0])
  assert pass_steps.scaled_size((33, 64), 0.75) == (25, 48)
