"""Training and evaluation curves: TensorBoard event files."""

from __future__ import annotations

import os
from typing import Dict

__all__ = ["MetricWriter"]


class MetricWriter:
  """TensorBoard event files in WORKDIR/tensorboard (tensorboardX, no TensorFlow needed)."""

  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter

    self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def scalars(self, step: int, values: Dict[str, float]) -> None:
    for k, v in values.items():
      self._writer.add_scalar(k, float(v), step)

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()
