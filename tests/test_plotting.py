"""score_jax/plotting.py: the scatter plot's frame shows the samples, wherever they fall."""

import numpy as np
import pytest

from score_jax import plotting


@pytest.fixture
def drawn(monkeypatch):
  """The axes (x limits, y limits, title) of every panel save_scatter draws."""
  panels = []

  def keep(path, fig, dpi=100):
    panels.extend((ax.get_xlim(), ax.get_ylim(), ax.get_title()) for ax in fig.axes)
    import matplotlib.pyplot as plt
    plt.close(fig)

  monkeypatch.setattr(plotting, "save_figure", keep)
  return panels


def test_scatter_frame_holds_samples_far_from_the_data(drawn, tmp_path):
  """A short run's samples spread 10x wider than the checkerboard-like data: every one of
  them lies inside both panels' axes (the frame used to follow the data alone)."""
  rng = np.random.default_rng(0)
  data = rng.uniform(-1.0, 1.0, size=(1000, 2))
  samples = rng.normal(scale=10.0, size=(512, 2)) + np.array([30.0, -5.0])
  lo, hi = plotting.save_scatter(str(tmp_path / "s.png"), samples, data)
  assert len(drawn) == 2 and drawn[0][2] == "samples"
  for (x0, x1), (y0, y1), _ in drawn:
    assert x0 < samples[:, 0].min() and samples[:, 0].max() < x1
    assert y0 < samples[:, 1].min() and samples[:, 1].max() < y1
    assert x0 < -1.0 and y0 < -1.0 and 1.0 < y1  # and the data's range
  np.testing.assert_allclose(drawn[0][0], (lo[0], hi[0]))
  # A frame no wider than the points plus the 5% margin on each side.
  np.testing.assert_allclose(hi[0] - lo[0], 1.1 * (samples[:, 0].max() - data[:, 0].min()))


def test_scatter_frame_cut_for_outliers_counts_them(drawn, tmp_path):
  """Three samples at 1e6 and one NaN (a diverged sampler) would shrink the rest to a dot:
  the frame keeps to the bulk and the title says how many samples it leaves out."""
  rng = np.random.default_rng(1)
  data = rng.normal(size=(1000, 2))
  samples = rng.normal(size=(400, 2))
  samples[:3] = 1e6
  samples[3, 1] = np.nan
  plotting.save_scatter(str(tmp_path / "s.png"), samples, data)
  (x0, x1), (y0, y1), title = drawn[0]
  assert title == "samples (4 of 400 outside the frame)"
  assert -10 < x0 < -3 and 3 < x1 < 10 and -10 < y0 < -3 and 3 < y1 < 10
  bulk = samples[4:]
  assert np.all((bulk[:, 0] > x0) & (bulk[:, 0] < x1) & (bulk[:, 1] > y0) & (bulk[:, 1] < y1))
