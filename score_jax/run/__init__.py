"""The running layer: the only layer that reads configs.

`settings` turns a ConfigDict into validated settings; `programs` builds the
run's objects and jitted programs once; `train`, `evaluate` and `sample` are
the modes (`entry.run` dispatches them); `checkpoints`, `state`, `distributed`,
`quality`, `phema` and `writers` serve them; `load.load_run` opens a workdir.
"""
