"""Running conversions: opening a checkpoint (`checkpoint`, `discover`), shard jobs and their runners
(`shardjob`, `parallel` for local threads, `ray_runner`), many checkpoints (`batch`, `batch_job`) and
the reports they give (`report`).
"""
