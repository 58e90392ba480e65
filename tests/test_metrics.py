"""Tests of FID, KID, IS and dataset statistics against independent formulas."""

import os

import numpy as np
import pytest
import scipy.linalg

from score_jax.metrics import stats as metrics


def _random_features(rng, n, d, shift=0.0):
  mix = rng.standard_normal((d, d)) / np.sqrt(d)
  return rng.standard_normal((n, d)) @ mix + shift


def _fid_scipy(f1, f2):
  """Independent FID: np.cov + scipy.linalg.sqrtm of the product."""
  mu1, mu2 = f1.mean(0), f2.mean(0)
  s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  covmean = np.real(covmean)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_scipy_sqrtm():
  rng = np.random.default_rng(0)
  f1 = _random_features(rng, 400, 16)
  f2 = _random_features(rng, 300, 16, shift=0.3) * 1.2
  got, want = metrics.fid(f1, f2), _fid_scipy(f1, f2)
  assert want > 0.5
  np.testing.assert_allclose(got, want, rtol=1e-9)


def test_fid_singular_covariances_match_scipy():
  # Fewer samples than dimensions: rank-deficient covariances.
  rng = np.random.default_rng(1)
  f1, f2 = _random_features(rng, 10, 24), _random_features(rng, 12, 24, 0.1)
  mu1, s1 = metrics.stats_from_features(f1)
  mu2, s2 = metrics.stats_from_features(f2)
  # scipy needs the usual eps offset here; with it the two agree closely.
  eps = 1e-10 * np.eye(24)
  covmean = np.real(scipy.linalg.sqrtm((s1 + eps) @ (s2 + eps)))
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
  np.testing.assert_allclose(metrics.fid_from_stats(mu1, s1, mu2, s2), want, rtol=1e-5)


def test_fid_identical_sets_is_zero():
  rng = np.random.default_rng(2)
  f = _random_features(rng, 500, 32) + 5.0
  assert abs(metrics.fid(f, f)) < 1e-9 * np.trace(np.cov(f, rowvar=False))
  mu, s = metrics.stats_from_features(f)
  assert abs(metrics.fid_from_stats(mu, s, mu, s)) < 1e-9


def test_fid_two_gaussians_closed_form():
  rng = np.random.default_rng(3)
  d = 12
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  want = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
  got = metrics.fid_from_stats(mu1, np.diag(v1), mu2, np.diag(v2))
  np.testing.assert_allclose(got, want, rtol=1e-12)
  # Same closed form in a rotated basis (non-diagonal, commuting covariances).
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  got_rot = metrics.fid_from_stats(q @ mu1, q @ np.diag(v1) @ q.T,
                                   q @ mu2, q @ np.diag(v2) @ q.T)
  np.testing.assert_allclose(got_rot, want, rtol=1e-10)


def test_fid_rejects_bad_input():
  with pytest.raises(ValueError, match="shape"):
    metrics.fid_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="non-finite"):
    metrics.fid_from_stats(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    metrics.fid(np.zeros(5), np.zeros(5))


def _mmd_unbiased_loops(x, y):
  """Explicit O(n^2) unbiased MMD^2 with k(a, b) = (a.b/d + 1)^3."""
  d = x.shape[1]
  k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3
  m, n = len(x), len(y)
  sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
  syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j)
  sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n))
  return sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2 * sxy / (m * n)


def test_kid_matches_explicit_unbiased_formula():
  rng = np.random.default_rng(4)
  x = _random_features(rng, 25, 6)
  y = _random_features(rng, 25, 6, shift=0.5)
  # One subset of all rows: the subset is a permutation, the estimate is exact.
  mean, std = metrics.kid(x, y, num_subsets=1, subset_size=25, rng=0)
  np.testing.assert_allclose(mean, _mmd_unbiased_loops(x, y), rtol=1e-10)
  assert std == 0.0


def test_kid_subsets():
  rng = np.random.default_rng(5)
  both = _random_features(rng, 350, 8)  # one distribution, two samples
  x, y = both[:200], both[200:]
  mean, std = metrics.kid(x, y, num_subsets=20, subset_size=100, rng=1)
  # Same distribution: unbiased estimate centred on 0 (subsets overlap, so
  # compare with the per-subset spread, not the standard error).
  assert abs(mean) < 3 * std
  shifted, _ = metrics.kid(x, y + 1.0, num_subsets=20, subset_size=100, rng=1)
  assert shifted > mean + 10 * std
  # Deterministic for a given seed.
  assert metrics.kid(x, y, num_subsets=3, subset_size=50, rng=7) == \
      metrics.kid(x, y, num_subsets=3, subset_size=50, rng=7)


def test_inception_score_bounds():
  n, c = 60, 10
  uniform = np.full((n, c), 1.0 / c)
  assert metrics.inception_score(uniform, from_logits=False)[0] == pytest.approx(1.0, abs=1e-12)
  assert metrics.inception_score(np.zeros((n, c)))[0] == pytest.approx(1.0, abs=1e-12)
  onehot = np.eye(c)[np.arange(n) % c]
  assert metrics.inception_score(onehot, from_logits=False)[0] == pytest.approx(c, rel=1e-12)
  # Confident logits: close to C from below.
  score, _ = metrics.inception_score(50.0 * onehot)
  assert c * (1 - 1e-6) < score <= c
  # Splits: each split of 10 rows is evenly spread -> every split scores C.
  mean, std = metrics.inception_score(onehot, num_splits=6, from_logits=False)
  assert mean == pytest.approx(c) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_logits_equal_probs():
  rng = np.random.default_rng(6)
  logits = rng.standard_normal((40, 7)) * 3
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  a = metrics.inception_score(logits, num_splits=4)
  b = metrics.inception_score(probs, num_splits=4, from_logits=False)
  np.testing.assert_allclose(a, b, rtol=1e-10)
  # Independent formula for one split.
  q = probs.mean(0)
  want = np.exp(np.mean(np.sum(probs * (np.log(probs) - np.log(q)), axis=1)))
  np.testing.assert_allclose(metrics.inception_score(logits)[0], want, rtol=1e-10)


def test_running_stats_streaming_matches_numpy():
  rng = np.random.default_rng(7)
  f = _random_features(rng, 1000, 10) * 0.01 + 1e4  # large mean, small spread
  rs = metrics.RunningStats(10)
  for chunk in np.array_split(f, 7):
    rs.update(chunk.astype(np.float32).astype(np.float64))
  ref = f.astype(np.float32).astype(np.float64)
  np.testing.assert_allclose(rs.mean(), ref.mean(0), rtol=1e-12)
  np.testing.assert_allclose(rs.cov(), np.cov(ref, rowvar=False), rtol=1e-7, atol=1e-12)
  assert rs.count == 1000


def test_stats_file_round_trip_and_errors(tmp_path):
  rng = np.random.default_rng(8)
  f = _random_features(rng, 50, 4)
  mu, sigma = metrics.stats_from_features(f)
  path = tmp_path / "sub" / "stats.npz"
  metrics.save_stats(path, mu, sigma, num_images=50, features=f[:5])
  st = metrics.load_stats(path)
  np.testing.assert_array_equal(st.mu, mu)
  np.testing.assert_array_equal(st.sigma, sigma)
  assert st.num_images == 50 and st.features.shape == (5, 4)
  assert not os.path.exists(str(path) + ".tmp")

  # score_sde layout: all pool_3 features.
  np.savez(tmp_path / "pool3.npz", pool_3=f)
  st = metrics.load_stats(tmp_path / "pool3.npz")
  np.testing.assert_allclose(st.sigma, np.cov(f, rowvar=False), rtol=1e-12)

  with pytest.raises(FileNotFoundError, match="dataset_stats"):
    metrics.load_stats(tmp_path / "nope.npz")
  np.savez(tmp_path / "nokey.npz", mean=mu)
  with pytest.raises(ValueError, match="'mu' and 'sigma'"):
    metrics.load_stats(tmp_path / "nokey.npz")
  np.savez(tmp_path / "shape.npz", mu=mu, sigma=sigma[:3])
  with pytest.raises(ValueError, match="malformed"):
    metrics.load_stats(tmp_path / "shape.npz")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="not a readable"):
    metrics.load_stats(tmp_path / "junk.npz")


def test_dataset_stats_streams_and_caches(tmp_path):
  rng = np.random.default_rng(9)
  images = rng.integers(0, 256, (23, 4, 4, 3), dtype=np.uint8)
  calls = []

  def feature_fn(batch):
    calls.append(batch.shape[0])
    return batch.reshape(batch.shape[0], -1)[:, :6].astype(np.float32) / 255.0

  def batches():
    for i in range(0, 23, 5):
      yield images[i:i + 5]

  path = tmp_path / "stats.npz"
  st = metrics.dataset_stats(path, batches(), feature_fn, num_features_kept=8)
  ref = images.reshape(23, -1)[:, :6].astype(np.float64) / 255.0
  np.testing.assert_allclose(st.mu, ref.mean(0), rtol=1e-6)
  np.testing.assert_allclose(st.sigma, np.cov(ref, rowvar=False), rtol=1e-5, atol=1e-9)
  assert st.num_images == 23 and sum(calls) == 23
  # Kept rows are a sample of the real feature rows.
  assert st.features.shape == (8, 6)
  assert all(np.any(np.all(np.isclose(ref, r, atol=1e-6), axis=1)) for r in st.features)

  # Cached: the feature function is not called again.
  calls.clear()
  st2 = metrics.dataset_stats(path, batches(), feature_fn)
  assert not calls
  np.testing.assert_array_equal(st2.sigma, st.sigma)
  # recompute + max_images.
  st3 = metrics.dataset_stats(path, batches(), feature_fn, recompute=True, max_images=12)
  assert st3.num_images == 12 and sum(calls) == 12
  np.testing.assert_allclose(st3.mu, ref[:12].mean(0), rtol=1e-6)

  with pytest.raises(TypeError, match="uint8"):
    metrics.dataset_stats(tmp_path / "f.npz", [images.astype(np.float32)], feature_fn)
