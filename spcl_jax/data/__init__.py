"""The data a run reads: the dataset names (`catalog`), built datasets and
their splits (`sources`), record codecs (`codecs`), resizing (`resize`),
the recipe's per-record transforms (`transforms`), the pseudo-label storage
format (`pseudo_labels`), grain loaders (`loaders`) and global batches over
the mesh (`global_batches`).

May import: `spcl_jax.infra`, `spcl_jax.core` (checked by `lint-imports`,
.importlinter). `data_prep` may import `catalog`, `codecs` and `resize`.
"""
