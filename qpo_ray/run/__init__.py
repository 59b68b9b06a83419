"""The run's plumbing: the order of stages (`pipeline`), the stages themselves (`stages/`),
the loop that runs them (`loop`), the run directory with its markers and lock (`rundir`),
resume (`resume`), MLflow tracking (`tracking`, `stage_logging`) and the commands shared by
the CLI and the Ray jobs (`commands`). Nothing below this package imports it."""
