"""The resumable pipeline: the stages as data (`stage_graph`), running them
(`pipeline`), the runners of each kind (`train_stage`, `pass_stages`), the
step loop (`step_loop`), what a stage runs with (`context`), the processes
acting together (`processes`), passes over a split (`passes`), earlier
stages' outputs (`stage_outputs`), the config's checks (`config_checks`,
`released`), pretraining as a library (`pretraining`), a trained model's
workdir for the commands (`trained_model`), and the one door to `data_prep`
(`builds`).

May import: every layer below (`report`, `data`, `models`, `infra`,
`core`); `data_prep` only through `builds` (checked by `lint-imports`,
.importlinter).
"""
