"""The training progress bar, with every message printed above it, never into its line.

While the bar is shown, complete lines written to standard error (logging,
absl logging, warnings, print(..., file=sys.stderr)) go through `tqdm.write`,
which clears the bar, prints the line and redraws the bar below it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from typing import Iterator, List

__all__ = ["progress_bar"]


class _AboveBar(io.TextIOBase):
  """A text stream that prints complete lines above the bars drawn on `stream`."""

  def __init__(self, stream):
    super().__init__()
    self._stream = stream
    self._partial = ""

  def writable(self) -> bool:
    return True

  def write(self, text: str) -> int:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

    lines = (self._partial + text).split("\n")
    self._partial = lines.pop()
    for line in lines:
      tqdm.write(line, file=self._stream)
    return len(text)

  def flush(self) -> None:
    self._stream.flush()

  def close_partial(self) -> None:
    """Writes out a last line that has no newline yet."""
    if self._partial:
      self.write("\n")

  @property
  def encoding(self):  # pytype: disable=signature-mismatch
    return getattr(self._stream, "encoding", "utf-8")

  def isatty(self) -> bool:
    return self._stream.isatty()

  def fileno(self) -> int:
    return self._stream.fileno()


def _stream_handlers() -> List[logging.StreamHandler]:
  """The stream handlers of the root logger, absl's Python handler included."""
  out = []
  for handler in logging.getLogger().handlers:
    handler = getattr(handler, "python_handler", handler)  # absl.logging.ABSLHandler
    if isinstance(handler, logging.StreamHandler):
      out.append(handler)
  return out


@contextlib.contextmanager
def progress_bar(total: int, initial: int, enabled: bool, desc: str) -> Iterator[object]:
  """with progress_bar(...) as bar: a tqdm bar on standard error; messages written to standard
  error meanwhile are printed above it. Closed (and standard error restored) on exit."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  stderr = sys.stderr
  bar = tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc=desc,
             file=stderr)
  if not enabled:
    try:
      yield bar
    finally:
      bar.close()
    return
  above = _AboveBar(stderr)
  swapped = [(h, h.setStream(above)) for h in _stream_handlers() if h.stream is stderr]
  sys.stderr = above
  try:
    yield bar
  finally:
    above.close_partial()
    sys.stderr = stderr
    for handler, stream in swapped:
      handler.setStream(stream)
    bar.close()
