"""The public name of the SPCL core (SPEC §5: `spcl_jax.spcl.contrastive_loss`
and the rest of `spcl_jax.core.spcl`). The code lives in `spcl_jax.core.spcl`;
this module only keeps the name users script against."""

from spcl_jax.core.spcl import *  # pylint: disable=wildcard-import,unused-wildcard-import
