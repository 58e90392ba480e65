"""The running layer: the only layer that reads configs.

`settings` turns a ConfigDict into validated settings; `plan.make_plan` turns
them, once at a mode's entry, into the run plan (objects from `builders`,
samplers declared in `sampler_specs`); `programs` holds the jitted programs
over a plan; `train`, `evaluate` (its metrics in `eval_metrics/`) and `sample`
(its tasks in `sample_tasks`) are the modes, which read the plan and never
settings (`entry.run` dispatches them); `state`, `checkpoints`, `distributed`,
`grids`, `phema` and `writers` serve them; `load.load_run` opens a workdir;
`fid_stats` writes a dataset's FID reference statistics (a command of its own).
"""
