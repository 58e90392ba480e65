"""Convert willisma/SiT checkpoints into score_jax workdirs.

  python -m score_jax.convert --from=sit --config=configs/imagenet256_sit_xl2.py SiT-XL-2-256x256.pt runs/sit_xl2
  python main.py --config=runs/sit_xl2/config.json --workdir=runs/sit_xl2 --mode=sample

SiT (Ma et al. 2024) trains DiT's network (models.dit) on an interpolant, so its files are
DiT's files and are read by `score_jax.convert.dit`'s steps (without torch; nothing in the file
runs): a checkpoint of SiT's train.py, `torch.save({"model", "ema", "opt", "args"})`, with
--weights=ema (default) or model, or the released EMA state dict (`SiT-XL-2-256x256.pt`).
train.py's "args" name the preset ('SiT-XL/2', DiT's sizes), the class count and the
interpolant: only path_type 'Linear' with prediction 'velocity' (train.py's defaults, the
released network's) is score_jax's rectified-flow path; SiT's 'GVP' and 'VP' paths and its
score and noise predictions are refused, naming them. The final layer's width says whether the
file has DiT's learned-variance channels (SiT's train.py builds them, learn_sigma=True, and its
forward drops them): model.learn_sigma must say the same.

The config must be SiT's: model.name = 'dit', training.sde = 'rectified_flow',
training.continuous = True and model.parameterization = 'sit_velocity' (models.score): SiT's
time s runs from noise (0) to data (1) along x_s = s x_0 + (1 - s) z and its network predicts
x_0 - z, fed s in [0, 1]; score_jax's time is t = 1 - s and its velocity z - x_0 the network's
negative. configs/imagenet256_sit_xl2.py is that config.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from score_jax.convert.dit import DiTLayoutError, convert_network

__all__ = ["check_config", "check_interpolant", "convert"]


def check_config(s: Any) -> List[str]:
  """SiT's network and interpolant in the settings `s`. Returns notes.

  Raises:
    DiTLayoutError: another network, process or parameterization.
  """
  if s.model.name.lower() != "dit":
    raise DiTLayoutError(f"model.name={s.model.name!r}: SiT's networks convert into model.name="
                         "'dit' (configs/imagenet256_sit_xl2.py).")
  if (s.training.sde.lower() != "rectified_flow" or s.model.parameterization != "sit_velocity"
      or not s.training.continuous):
    raise DiTLayoutError(f"training.sde={s.training.sde!r}, model.parameterization="
                         f"{s.model.parameterization!r}, training.continuous="
                         f"{s.training.continuous}: SiT's networks predict the velocity of its "
                         "linear interpolant; set training.sde='rectified_flow', "
                         "model.parameterization='sit_velocity', training.continuous=True "
                         "(configs/imagenet256_sit_xl2.py).")
  return []


def check_interpolant(args: Any, source: str = "the file") -> List[str]:
  """train.py's transport arguments: the Linear path with velocity prediction. Returns notes.

  Raises:
    DiTLayoutError: another path or prediction, naming it.
  """
  notes = []
  path = getattr(args, "path_type", None)
  prediction = getattr(args, "prediction", None)
  if path is None or prediction is None:
    notes.append("train.py's arguments do not name the interpolant (path_type, prediction); "
                 "it is taken to be SiT's default, Linear with velocity prediction")
  if path is not None and str(path) != "Linear":
    raise DiTLayoutError(f"{source} was trained on SiT's {path!r} path; score_jax converts its "
                         "'Linear' path (the rectified flow) only.")
  if prediction is not None and str(prediction) != "velocity":
    raise DiTLayoutError(f"{source} predicts the {prediction!r}; score_jax converts SiT's "
                         "velocity networks (--prediction velocity) only.")
  return notes


def convert(src: str, dst: str, config: Any, *, weights: str = "ema",
            step: Optional[int] = None) -> Dict[str, Any]:
  """Converts SiT checkpoint `src` into score_jax workdir `dst`.

  Args:
    src: a train.py checkpoint (`<step>.pt`) or a released network (`SiT-XL-2-256x256.pt`).
    dst: workdir to create (or one without checkpoints).
    config: the config the network was trained with (configs/imagenet256_sit_xl2.py with
      overrides), a ConfigDict or settings.
    weights: 'ema' or 'model' (train.py checkpoints only).
    step: step to store the checkpoint at (default training.snapshot_freq).
  Returns:
    {'checkpoint': dst/checkpoints/<step>, 'step', 'weights', 'tensors': number converted,
     'notes': what was reported}.
  Raises:
    FileExistsError, FileNotFoundError, pickle.UnpicklingError, DiTLayoutError.
  """
  from score_jax.run import settings as settings_lib

  s = config if isinstance(config, settings_lib.Settings) else settings_lib.from_config(config)
  notes = check_config(s)
  return convert_network(src, dst, s, notes, weights=weights, step=step, family="SiT",
                         check_run=lambda args: check_interpolant(args, src))
