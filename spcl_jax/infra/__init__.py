"""Infrastructure: the file system (`storage`: local paths and `gs://`),
the workdir's atomic writes and litter (`workdir`), checkpoints (`checkpoint`,
orbax), the console and log (`console`), one-line flag and config errors
(`flag_errors`) and XLA's default flags (`xla_flags`).

May import: `spcl_jax.core` (checked by `lint-imports`, .importlinter).
"""
