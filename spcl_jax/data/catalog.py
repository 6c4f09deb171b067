"""The datasets `data_prep` builds, by name: the one list that the builders
(`data_prep.builders.DATASETS` maps each name to its TFDS builder) and the
readers (the build command a missing dataset's error prints) both read.

Any other name is a folder of the user's own images, built with
`python -m data_prep.build --dataset folder --name NAME`."""

# Read from the user's downloads (`--manual_dir`).
DOWNLOADED = ('gta5', 'synthia', 'synscapes', 'spcl_cityscapes', 'acdc',
              'dark_zurich')
# The datasets a pipeline run builds itself when they are missing
# (`data.build_if_missing`): rendered, nothing to download.
BUILT_BY_RUNS = ('sim2real_demo',)
DATASET_NAMES = BUILT_BY_RUNS + DOWNLOADED
