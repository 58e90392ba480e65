"""Conversion into score_jax workdirs: the 2021 reference checkpoints (`reference`), EDM's
and EDM2's network pickles (`edm`, `edm2`), facebookresearch/DiT and willisma/SiT checkpoints
(`dit`, `sit`), their readers (`torch_pickle`, `edm_pickle`), post-hoc EMA reconstruction
(`phema`), and the Stable Diffusion VAE from a diffusers folder (`vae.load_vae`). Command line:
`python -m score_jax.convert --from=...`."""
