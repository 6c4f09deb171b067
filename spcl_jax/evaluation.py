"""The public name of the segmentation metrics (SPEC §5:
`spcl_jax.evaluation.confusion_matrix`, `iou_from_confusion` and the rest of
`spcl_jax.core.metrics`). The code lives in `spcl_jax.core.metrics`; this
module only keeps the name users script against."""

from spcl_jax.core.metrics import *  # pylint: disable=wildcard-import,unused-wildcard-import
