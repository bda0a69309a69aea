"""The edit job: typed config, pre-flight checks and the output root's lease, the Ray Data graph
(skip join, read, prepare, edit, write, log), the driver, the console and the report. It knows
models only through :mod:`step1x_batch.models.base`. See docs/architecture.md."""
