"""The core: pure JAX and numpy, no files, no processes, no configs read
from disk.

The SPCL math (`spcl`: prototypes, contrastive loss, masks, thresholds), the
label tables (`labels`), segmentation metrics (`metrics`), the device mesh
(`mesh`), the train state and its optimisers (`train_state`), gradient
accumulation (`micro_batches`), the pure training steps (`train_steps`) and
the steps of the passes that do not train (`pass_steps`: evaluation with
test-time augmentation, prediction, prototypes, pseudo labels).

May import: nothing of spcl_jax outside `core` (checked by `lint-imports`,
.importlinter).
"""
