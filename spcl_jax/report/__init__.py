"""What a run shows: per-class IoU tables (`tables`), the console's stage
lines (`stage_lines`), TensorBoard dashboards (`dashboards`) and the
palette pictures (`visualize`).

May import: `spcl_jax.data`, `spcl_jax.models`, `spcl_jax.infra`,
`spcl_jax.core` (checked by `lint-imports`, .importlinter).
"""
