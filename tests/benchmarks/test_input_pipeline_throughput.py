"""The throughput benchmark times the pipeline's own work: its synthetic
records decode like stored ones and its transforms are the pipeline's."""

import numpy as np

from benchmarks import input_pipeline_throughput as bench
from spcl_jax.data import loaders
from spcl_jax.data import transforms


def test_synthetic_records_decode_like_stored_ones():
  source = bench.SyntheticSource((40, 64), count=5, distinct=2)
  assert len(source) == 5
  record = source[3]
  assert record['image'].shape == (40, 64, 3)
  assert record['image'].dtype == np.uint8
  assert record['label'].shape == (40, 64, 1)
  assert set(np.unique(record['label'])) <= set(range(19)) | {255}
  np.testing.assert_array_equal(record['image'], source[1]['image'])
  assert not np.array_equal(record['image'], source[0]['image'])


def test_timed_transforms_are_the_pipelines():
  source = bench.SyntheticSource((40, 64), count=4, distinct=2)
  spec = loaders.PipelineSpec('synthetic', 'val', '', 2, size=(20, 32),
                              resize_label=False)
  ops = loaders.transforms_of(spec)
  batch = next(iter(loaders.eval_batches(spec, source, 0, 1, threads=0)))
  for i in range(2):
    element = bench.apply(ops, source[i], seed=i)
    np.testing.assert_array_equal(element['image'], batch['image'][i])
    np.testing.assert_array_equal(element['label'], batch['label'][i])
  jittered = loaders.transforms_of(loaders.PipelineSpec(
      'synthetic', 'train', '', 2, color_jitter=bench.JITTER))
  released = bench.with_jitter(jittered, 'released')
  assert [type(op) for op in released] == [type(op) for op in jittered]
  assert [op.implementation for op in released
          if isinstance(op, transforms.ColorJitter)] == ['released']
  assert bench.per_core_rate(source, released, 2) > 0
