"""Sample-quality metrics on Inception features: FID, KID, Inception Score.

All functions take host numpy arrays and compute in float64. Conventions of
the reference (score_sde, which calls TF-GAN on 50k samples):
  * FID: Frechet distance between Gaussians fitted to pool_3 features
    (covariance with ddof=1), ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2).
  * IS: exp(E_x KL(p(y|x) || p(y))) over the softmax of all 1008 logits; the
    reference (`tfgan.eval.classifier_score_from_logits`) uses all samples in
    ONE split, so `num_splits=1` is the default here. Salimans et al. (2016)
    used 10 splits of 5k and report mean +- std; pass `num_splits=10` for that.
  * KID: unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, mean and
    std over random subsets (Binkowski et al. 2018: 100 subsets of 1000).
    TF-GAN (hence the reference) instead averages over disjoint blocks of at
    most 1024; both are unbiased estimates of the same quantity.

Dataset statistics (mu, sigma of pool features of all training images as
uint8, no dequantization) are accumulated streaming (`RunningStats`) and
cached in an .npz with keys "mu" and "sigma" (the pytorch-fid layout), plus
optional "num_images" and "features" (a uniform random sample of feature
rows, for KID against the dataset).
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, NamedTuple, Optional, Tuple

import numpy as np

from score_jax import files

__all__ = [
    "fid_from_stats",
    "fid",
    "kid",
    "inception_score",
    "RunningStats",
    "Stats",
    "stats_from_features",
    "save_stats",
    "load_stats",
    "dataset_stats",
]


def _check_features(feats: np.ndarray, name: str) -> np.ndarray:
  feats = np.asarray(feats, np.float64)
  if feats.ndim != 2:
    raise ValueError(f"{name} must be [N, D], got shape {feats.shape}")
  if feats.shape[0] < 2:
    raise ValueError(f"{name} needs at least 2 rows, got {feats.shape[0]}")
  if not np.all(np.isfinite(feats)):
    raise ValueError(f"{name} has non-finite values")
  return feats


def _sqrt_psd(mat: np.ndarray) -> np.ndarray:
  """Symmetric PSD square root by eigen-decomposition (negative eigenvalues,
  which are round-off, are clipped to 0)."""
  w, v = np.linalg.eigh(mat)
  return (v * np.sqrt(np.clip(w, 0.0, None))[None, :]) @ v.T


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                   sigma2: np.ndarray) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  tr((S1 S2)^1/2) is computed as tr((A S2 A)^1/2) with A = S1^1/2: S1 S2 and
  A S2 A are similar, so they share eigenvalues, and A S2 A is symmetric PSD,
  so `eigvalsh` gives real eigenvalues and no complex round-off arises (the
  scipy.linalg.sqrtm route of pytorch-fid needs an eps*I offset when S1 S2 is
  near singular and drops imaginary parts). This is TF-GAN's method; it is
  exact for singular covariances (fewer samples than dimensions) too.

  Args:
    mu1, mu2: [D] means.  sigma1, sigma2: [D, D] covariances.
  Returns:
    The FID as a Python float (>= 0 up to round-off).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  d = mu1.shape[0] if mu1.ndim == 1 else -1
  if mu1.ndim != 1 or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
    raise ValueError(f"shape mismatch: mu1 {mu1.shape}, sigma1 {s1.shape}, "
                     f"mu2 {mu2.shape}, sigma2 {s2.shape}")
  for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{name} has non-finite values")
  a = _sqrt_psd(0.5 * (s1 + s1.T))
  m = a @ s2 @ a
  ev = np.linalg.eigvalsh(0.5 * (m + m.T))
  tr_covmean = float(np.sum(np.sqrt(np.clip(ev, 0.0, None))))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def stats_from_features(feats: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] (ddof=1) of features [N, D], float64."""
  feats = _check_features(feats, "features")
  rs = RunningStats(feats.shape[1])
  rs.update(feats)
  return rs.mean(), rs.cov()


def fid(feats1: np.ndarray, feats2: np.ndarray) -> float:
  """FID between two feature sets [N1, D], [N2, D]."""
  return fid_from_stats(*stats_from_features(feats1), *stats_from_features(feats2))


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def kid(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100,
        subset_size: int = 1000,
        rng: np.random.Generator | int | None = 0) -> Tuple[float, float]:
  """Kernel Inception Distance: unbiased MMD^2, cubic polynomial kernel.

  For each subset, m = min(N1, N2, subset_size) rows are drawn without
  replacement from each set, and
    MMD^2_u = sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(m(m-1))
              - 2 sum_{i,j} k(x_i,y_j)/m^2,   k(x,y) = (x.y/d + 1)^3.

  Args:
    feats1, feats2: [N1, D], [N2, D] features.
    num_subsets: number of random subsets.
    subset_size: rows per subset (capped at min(N1, N2)).
    rng: numpy Generator or seed (default 0: deterministic).
  Returns:
    (mean, std) over subsets (std with ddof=0; 0 for one subset).
  """
  x_all = _check_features(feats1, "feats1")
  y_all = _check_features(feats2, "feats2")
  if x_all.shape[1] != y_all.shape[1]:
    raise ValueError(f"feature dims differ: {x_all.shape} vs {y_all.shape}")
  if num_subsets < 1:
    raise ValueError("num_subsets must be >= 1")
  rng = np.random.default_rng(rng)
  m = min(x_all.shape[0], y_all.shape[0], subset_size)
  if m < 2:
    raise ValueError("subset_size must be >= 2")
  vals = np.empty(num_subsets)
  for s in range(num_subsets):
    x = x_all[rng.choice(x_all.shape[0], m, replace=False)]
    y = y_all[rng.choice(y_all.shape[0], m, replace=False)]
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    off = m * (m - 1)
    vals[s] = ((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off
               - 2.0 * kxy.mean())
  return float(vals.mean()), float(vals.std())


def inception_score(preds: np.ndarray, num_splits: int = 1, *,
                    from_logits: bool = True) -> Tuple[float, float]:
  """Inception Score exp(E_x KL(p(y|x) || p(y))).

  Args:
    preds: [N, C] logits (default) or probabilities (`from_logits=False`).
    num_splits: the N rows are cut into this many contiguous splits and the
      score computed per split (p(y) is the split's mean). 1 = reference
      (TF-GAN, all samples together); 10 = Salimans et al.
  Returns:
    (mean, std) of the per-split scores (std ddof=0; 0 for one split).
  """
  preds = np.asarray(preds, np.float64)
  if preds.ndim != 2:
    raise ValueError(f"preds must be [N, C], got {preds.shape}")
  if not np.all(np.isfinite(preds)):
    raise ValueError("preds has non-finite values")
  n = preds.shape[0]
  if not 1 <= num_splits <= n:
    raise ValueError(f"num_splits must be in [1, {n}], got {num_splits}")
  if from_logits:
    shifted = preds - preds.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    p = np.exp(logp)
  else:
    if np.any(preds < 0) or not np.allclose(preds.sum(axis=1), 1.0, atol=1e-4):
      raise ValueError("probabilities must be non-negative with rows summing to 1")
    p = preds
    with np.errstate(divide="ignore"):
      logp = np.log(p)
  scores = []
  for idx in np.array_split(np.arange(n), num_splits):
    ps, lps = p[idx], logp[idx]
    with np.errstate(divide="ignore"):
      logq = np.log(ps.mean(axis=0))  # [C]
    # 0 log 0 = 0: terms with p = 0 contribute nothing (and q >= p > 0).
    pos = ps > 0
    safe_logq = np.where(np.isfinite(logq), logq, 0.0)
    terms = np.where(pos, ps * (np.where(pos, lps, 0.0) - safe_logq[None, :]), 0.0)
    scores.append(np.exp(terms.sum(axis=1).mean()))
  scores = np.asarray(scores)
  return float(scores.mean()), float(scores.std())


class RunningStats:
  """Streaming mean and covariance of feature rows, in float64.

  Keeps sum(x - c) and sum((x - c)(x - c)^T) with the shift c = mean of the
  first batch, which avoids the cancellation of the plain sum(x x^T) form
  when |mean| >> std. Memory is O(D^2) whatever the number of rows.
  """

  def __init__(self, dim: int):
    self.dim = dim
    self.count = 0
    self._shift: Optional[np.ndarray] = None
    self._sum = np.zeros(dim, np.float64)
    self._sum_sq = np.zeros((dim, dim), np.float64)

  def update(self, feats: np.ndarray) -> None:
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or feats.shape[1] != self.dim:
      raise ValueError(f"expected [N, {self.dim}] features, got {feats.shape}")
    if feats.shape[0] == 0:
      return
    if not np.all(np.isfinite(feats)):
      raise ValueError("features have non-finite values")
    if self._shift is None:
      self._shift = feats.mean(axis=0)
    z = feats - self._shift[None, :]
    self._sum += z.sum(axis=0)
    self._sum_sq += z.T @ z
    self.count += feats.shape[0]

  def mean(self) -> np.ndarray:
    if self.count == 0:
      raise ValueError("no features accumulated")
    return self._shift + self._sum / self.count

  def cov(self) -> np.ndarray:
    """Unbiased (ddof=1) covariance [D, D]."""
    if self.count < 2:
      raise ValueError("covariance needs at least 2 rows")
    m = self._sum / self.count
    c = (self._sum_sq - self.count * np.outer(m, m)) / (self.count - 1)
    return 0.5 * (c + c.T)


class Stats(NamedTuple):
  """Contents of a statistics file."""
  mu: np.ndarray  # [D] float64
  sigma: np.ndarray  # [D, D] float64
  num_images: int  # rows the statistics were computed from (-1 = unknown)
  features: Optional[np.ndarray]  # [K, D] float32 sample of rows, or None


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, *,
               num_images: int = -1, features: Optional[np.ndarray] = None) -> None:
  """Writes statistics as .npz ("mu", "sigma", "num_images"[, "features"]).

  Written to a temporary file and renamed, so an interrupted run leaves no
  half-written cache. Missing parent directories are created.
  """
  path = os.fspath(path)
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  _validate_stats(mu, sigma, path)
  arrays = dict(mu=mu, sigma=sigma, num_images=np.int64(num_images))
  if features is not None:
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or features.shape[1] != mu.shape[0]:
      raise ValueError(f"features must be [K, {mu.shape[0]}], got {features.shape}")
    arrays["features"] = features
  files.save_npz(path, **arrays)


def _validate_stats(mu: np.ndarray, sigma: np.ndarray, source: str) -> None:
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{source}: malformed statistics: mu {mu.shape}, "
                     f"sigma {sigma.shape} (expected [D] and [D, D])")
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f"{source}: statistics have non-finite values")


def load_stats(path: str | os.PathLike) -> Stats:
  """Reads a statistics .npz.

  Accepts our files and pytorch-fid's (keys "mu", "sigma"), and score_sde's
  (key "pool_3": all feature rows, from which mu and sigma are computed).

  Raises:
    FileNotFoundError: no file (the message says how to compute one).
    ValueError: unreadable file, missing keys, or inconsistent shapes.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"no dataset statistics at {path!r}: compute them once with "
        "`score_jax.metrics.stats.dataset_stats` (the eval mode's statistics option "
        "does this over all training images)")
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: np.asarray(data[k]) for k in data.files}
  except Exception as e:
    raise ValueError(f"{path}: not a readable .npz statistics file ({e})") from e
  if "mu" in arrays and "sigma" in arrays:
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    features = arrays.get("features")
    num = int(arrays.get("num_images", -1))
  elif "pool_3" in arrays:
    features = arrays["pool_3"]
    mu, sigma = stats_from_features(features)
    num = features.shape[0]
  else:
    raise ValueError(f"{path}: statistics file needs keys 'mu' and 'sigma' "
                     f"(or 'pool_3'), found {sorted(arrays)}")
  _validate_stats(mu, sigma, path)
  if features is not None:
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or features.shape[1] != mu.shape[0]:
      raise ValueError(f"{path}: features {features.shape} do not match mu {mu.shape}")
  return Stats(mu, sigma, num, features)


def dataset_stats(path: str | os.PathLike,
                  images: Iterable[np.ndarray],
                  feature_fn: Callable[[np.ndarray], np.ndarray], *,
                  recompute: bool = False,
                  num_features_kept: int = 0,
                  seed: int = 0,
                  max_images: Optional[int] = None) -> Stats:
  """Feature statistics of a dataset, cached in `path`.

  If `path` exists (and not `recompute`) it is loaded and `images` is not
  touched. Otherwise every batch is passed through `feature_fn` and folded
  into running float64 sums, so the images and the features of the whole
  set never sit in memory; the result is saved to `path` and returned.

  Args:
    path: the .npz cache.
    images: iterable of uint8 batches [B, H, W, C] (the raw training images:
      no dequantization, no centering; the feature function maps to [-1, 1]).
    feature_fn: uint8 batch -> features [B, D] (e.g. the Inception pool).
    recompute: ignore an existing file and overwrite it.
    num_features_kept: keep a uniform random sample (reservoir) of this many
      feature rows in the file, for KID against the dataset; 0 keeps none.
    seed: seed of that sample.
    max_images: stop after this many images (the rest of the batch is cut).
  Returns:
    The `Stats` of the file.
  """
  path = os.fspath(path)
  if os.path.exists(path) and not recompute:
    return load_stats(path)
  rs: Optional[RunningStats] = None
  rng = np.random.default_rng(seed)
  kept: Optional[np.ndarray] = None
  for batch in images:
    batch = np.asarray(batch)
    if batch.dtype != np.uint8:
      raise TypeError(f"dataset_stats expects uint8 image batches (raw data, "
                      f"no dequantization), got {batch.dtype}")
    if max_images is not None:
      room = max_images - (rs.count if rs is not None else 0)
      if room <= 0:
        break
      batch = batch[:room]
    feats = np.asarray(feature_fn(batch), np.float64)
    if feats.ndim != 2 or feats.shape[0] != batch.shape[0]:
      raise ValueError(f"feature_fn returned {feats.shape} for a batch of {batch.shape[0]}")
    if rs is None:
      rs = RunningStats(feats.shape[1])
      if num_features_kept:
        kept = np.zeros((0, feats.shape[1]), np.float32)
    seen = rs.count
    rs.update(feats)
    if kept is not None:
      kept = _reservoir(kept, feats.astype(np.float32), seen, num_features_kept, rng)
  if rs is None or rs.count < 2:
    raise ValueError("dataset_stats needs at least 2 images")
  stats = Stats(rs.mean(), rs.cov(), rs.count, kept)
  save_stats(path, stats.mu, stats.sigma, num_images=stats.num_images, features=kept)
  return stats


def _reservoir(kept: np.ndarray, new: np.ndarray, seen: int, k: int,
               rng: np.random.Generator) -> np.ndarray:
  """Algorithm R over a batch: afterwards `kept` is a uniform k-sample."""
  fill = min(k - kept.shape[0], new.shape[0])
  if fill > 0:
    kept = np.concatenate([kept, new[:fill]], axis=0)
  for i in range(fill, new.shape[0]):
    j = rng.integers(0, seen + i + 1)
    if j < k:
      kept[j] = new[i]
  return kept
