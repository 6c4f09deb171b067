"""Built datasets: a missing one is named with its directory and build
command."""

import pytest

from spcl_jax.data import sources


def test_missing_dataset_names_dataset_directory_and_command(tmp_path):
  with pytest.raises(sources.DatasetNotBuiltError) as e:
    sources.open_source('sim2real_demo/tiny', 'source_train', str(tmp_path))
  message = str(e.value)
  assert "'sim2real_demo/tiny'" in message
  assert str(tmp_path / 'sim2real_demo' / 'tiny') in message
  assert (f'python -m data_prep.build --dataset sim2real_demo --config tiny '
          f'--data_dir {tmp_path}') in message
