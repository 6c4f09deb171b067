"""The shift probe re-renders exactly the stored target_val split, scores it
like the pipeline, and each variant swaps only its own style fields."""

import jax
import numpy as np
import pytest

from benchmarks import shift_probe
from configs import demo
from data_prep import sim2real_render as render_lib
from spcl_jax.core import metrics
from spcl_jax.core import pass_steps
from spcl_jax.data import loaders
from spcl_jax.data import sources
from spcl_jax.models import from_config
from spcl_jax.run import pretraining


def _tiny_config(data_dir):
  config = demo.get_config('smoke')
  config.data.data_dir = data_dir
  return config


def test_base_variant_is_the_stored_split_and_scores_like_the_pipeline(
    tiny_demo):
  config = _tiny_config(tiny_demo)
  stored = sources.open_source(config.data.target, 'target_val', tiny_demo)
  images, labels = shift_probe.render_val(
      shift_probe.demo_config(config.data.target),
      shift_probe.variant_style('base'), range(len(stored)))
  for record in (stored[i] for i in range(len(stored))):  # stored shuffled
    image_id = record['image_id']
    i = int((image_id.decode() if isinstance(image_id, bytes)
             else str(image_id)).rsplit('_', 1)[1])
    np.testing.assert_array_equal(images[i], record['image'])
    np.testing.assert_array_equal(labels[i], record['label'].reshape(
        labels[i].shape))

  variables = pretraining.initial_variables(config, jax.random.PRNGKey(0))
  result = shift_probe.probe(config, variables, ['base', 'source_camera'],
                             num_images=len(stored), batch_size=6)
  model = from_config.model_for_stage(config, False)
  eval_step = jax.jit(pass_steps.make_eval_step(model))
  spec = loaders.PipelineSpec(dataset=config.data.target, split='target_val',
                              data_dir=tiny_demo, global_batch_size=8,
                              size=tuple(config.data.eval_size),
                              resize_label=False, shuffle=False)
  confusion = sum(np.asarray(eval_step(variables, {
      k: b[k] for k in ('image', 'label', 'valid')}))
                  for b in loaders.eval_batches(spec))
  assert result['base']['miou'] == pytest.approx(
      metrics.summarize(confusion, 19)['miou'], abs=1e-6)
  assert result['source_camera']['miou'] != result['base']['miou']


def test_each_variant_replaces_only_its_fields():
  real, synthetic = (render_lib.STYLES['real'],
                     render_lib.STYLES['synthetic'])
  for name, fields in shift_probe.VARIANTS.items():
    style = shift_probe.variant_style(name)
    for field in real._fields:
      expected = getattr(synthetic if field in fields else real, field)
      assert getattr(style, field) == expected, (name, field)
  assert shift_probe.variant_style('base') == real
  with pytest.raises(ValueError, match='unknown variant'):
    shift_probe.variant_style('sourse_camera')


def test_sink_is_the_most_predicted_wrong_class():
  confusion = np.array([[5, 3, 0],    # true 0: 3 pixels predicted as 1
                        [0, 4, 0],
                        [1, 6, 2]])   # true 2: 6 pixels predicted as 1
  # class 1 takes 9 of the 5 + 3 + 1 + 6 + 2 = 17 pixels of classes 0 and 2
  assert shift_probe.sink(confusion) == (1, pytest.approx(100 * 9 / 17))


def test_refuses_other_datasets_and_too_many_images(tiny_demo):
  config = _tiny_config(tiny_demo)
  variables = pretraining.initial_variables(config, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match='target_val has 16 scenes'):
    shift_probe.probe(config, variables, ['base'], num_images=17)
  config.data.target = 'cityscapes'
  with pytest.raises(ValueError, match='sim2real_demo only'):
    shift_probe.probe(config, variables, ['base'], num_images=1)
