"""Conversion into score_jax workdirs: the 2021 reference checkpoints (`reference`), EDM's
network pickles (`edm`), their readers (`torch_pickle`, `edm_pickle`), and post-hoc EMA
reconstruction (`phema`). Command line: `python -m score_jax.convert --from=...`."""
