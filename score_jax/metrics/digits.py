"""A sample-quality number for the 8x8 digits that needs no Inception weights.

A small classifier (an MLP, 64 -> 256 -> 64 -> 10) is trained on the TRAIN
half of scikit-learn's digits (score_jax.data.digits: 1442 train, 355
held-out images) in a few seconds on a CPU, from a fixed seed (held-out
accuracy 98.6%). Its penultimate layer (64 ReLU features) plays the role of
Inception's pool_3. Numbers, with the held-out real images' value in brackets
(what a generator that draws new digits from the data distribution gets):

  digits_fd        Frechet distance (score_jax.metrics.stats.fid) between the features
                   of the samples and of the 1442 training images.
  digits_fd_floor  the same for the 355 held-out images [0.12]. Like every
                   FD, it is biased upwards at small N (held-out subsets of
                   100 / 200 / 355: 0.50 / 0.21 / 0.12), so:
  digits_fd_355    the mean digits FD of disjoint sets of 355 samples (the
                   held-out size; needs N >= 355): comparable with the floor
                   at equal N. digits_fd of N > 355 samples can be below the floor.
  digits_confident fraction of samples whose most probable class has
                   p(y|x) > 0.5: recognizable digits [0.97; uniform noise
                   0.13, pixel-shuffled digits 0.18, blurred digits 0.18].
  digits_classifier_score  exp(E_x KL(p(y|x) || p(y))), the Inception Score with
                   this classifier, 1..10 [5.8: label smoothing caps the
                   confidence, so 10 is out of reach; noise 1.3].
  digits_class_balance  entropy of the histogram of predicted classes / log 10:
                   1 when every digit is equally frequent [1.00: 34-38 per
                   class], lower under mode collapse (five digits only: 0.70).
  digits_class_counts  that histogram (10 counts).
  digits_label_accuracy  class-conditional samples: the fraction classified as
                   the class they were conditioned on [0.986].

Why these training choices: a plain cross-entropy MLP is confidently wrong
far from the data (uniform noise gets p > 0.5 for 97% of images), which makes
a confidence score useless; label smoothing (0.1), Gaussian input noise (0.1)
and weight decay make p(y|x) > 0.5 separate real digits from noise, shuffled
and blurred ones (the figures above) without costing accuracy. The network
and its training run on the host CPU whatever the accelerator, with all
randomness drawn by numpy from the seed, so the classifier (and hence the
numbers) are the same on every machine with the same JAX/XLA version.

Inputs: images uint8 [N, H, W, 1] (or [N, H, W]) with values 0..255, or
floats in [0, 1]; H = W = 8 k (digits upsampled by k with nearest-neighbour,
data.image_size = 8 k) are average-pooled back to 8x8, which inverts the
upsampling exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from score_jax import plotting
from score_jax.metrics import stats as metrics
from score_jax.data.digits import DIGITS_NUM_CLASSES, load_digits

__all__ = [
    "ClassifierSettings",
    "DigitsClassifier",
    "DigitsMetric",
    "to_unit_pixels",
    "train_classifier",
    "load_or_train",
    "default_metric",
    "digits_fd",
    "CONFIDENCE_THRESHOLD",
    "HELD_OUT_SIZE",
]

CONFIDENCE_THRESHOLD = 0.5  # max_y p(y|x) above it: the classifier commits to one digit
HELD_OUT_SIZE = 355  # images in the digits test split: the floor's N
_PIXELS = 64
_VERSION = 1  # bump when the network or training changes: cached classifiers are retrained


@dataclasses.dataclass(frozen=True)
class ClassifierSettings:
  """How the classifier is trained (everything that changes its parameters)."""
  seed: int = 0
  steps: int = 600
  batch_size: int = 128
  learning_rate: float = 2e-3
  weight_decay: float = 1e-2
  label_smoothing: float = 0.1
  input_noise: float = 0.1
  hidden: int = 256
  features: int = 64

  def fingerprint(self) -> str:
    blob = json.dumps({"version": _VERSION, **dataclasses.asdict(self)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class DigitsClassifier(nn.Module):
  """x [N, 64] in [0, 1] -> (features [N, features] after ReLU, logits [N, 10])."""
  hidden: int = 256
  features: int = 64

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(self.hidden)(x))
    h = nn.relu(nn.Dense(self.features)(h))
    return h, nn.Dense(DIGITS_NUM_CLASSES)(h)


def _cpu():
  return jax.devices("cpu")[0]


def to_unit_pixels(images: np.ndarray) -> np.ndarray:
  """Images (module docstring) -> float32 [N, 64] in [0, 1]."""
  a = np.asarray(images)
  if a.ndim == 4:
    if a.shape[-1] != 1:
      raise ValueError(f"digits are gray-scale: expected [N, H, W, 1], got {a.shape}")
    a = a[..., 0]
  if a.ndim != 3 or a.shape[1] != a.shape[2] or a.shape[1] % 8:
    raise ValueError(f"expected digit images [N, 8k, 8k(, 1)], got {np.shape(images)}")
  x = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
  if not np.all(np.isfinite(x)):
    raise ValueError("images have non-finite values")
  k = a.shape[1] // 8
  if k > 1:  # nearest-neighbour upsampling by k is undone exactly by k x k means
    x = x.reshape(x.shape[0], 8, k, 8, k).mean(axis=(2, 4))
  return np.clip(x, 0.0, 1.0).reshape(x.shape[0], _PIXELS)


def _train_pixels() -> Tuple[np.ndarray, np.ndarray]:
  images, labels = load_digits("train")
  return to_unit_pixels(images), np.asarray(labels, np.int32)


def _init_params(settings: ClassifierSettings) -> Dict[str, Any]:
  """LeCun-normal weights, zero biases, drawn with numpy from the seed.

  (Drawn on the host: compiling flax's truncated-normal init costs seconds on
  a CPU, several times the training itself.)
  """
  rng = np.random.default_rng(settings.seed)
  sizes = (_PIXELS, settings.hidden, settings.features, DIGITS_NUM_CLASSES)
  return {f"Dense_{i}": {"kernel": (rng.standard_normal((m, n)) / np.sqrt(m)).astype(np.float32),
                         "bias": np.zeros((n,), np.float32)}
          for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:]))}


@functools.partial(jax.jit, static_argnames=("hidden", "features", "learning_rate",
                                             "weight_decay", "input_noise"))
def _train(params: Any, x: jax.Array, targets: jax.Array, batches: jax.Array, noise: jax.Array,
           *, hidden: int, features: int, learning_rate: float, weight_decay: float,
           input_noise: float) -> Any:
  """AdamW over the minibatches: indices batches [steps, B], input noise [steps, B, 64]."""
  model = DigitsClassifier(hidden, features)
  tx = optax.adamw(learning_rate, weight_decay=weight_decay)

  def step(carry, inputs):
    params, opt_state = carry
    idx, eps = inputs

    def loss_fn(p):
      _, logits = model.apply({"params": p}, x[idx] + input_noise * eps)
      return optax.softmax_cross_entropy(logits, targets[idx]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), (batches, noise))
  return params


def train_classifier(settings: ClassifierSettings = ClassifierSettings()) -> Dict[str, Any]:
  """Trains the classifier on the train half, on the host CPU; returns numpy params.

  Deterministic: the initial weights, the minibatches (drawn with
  replacement) and the input noise all come from numpy's Generator(seed) on
  the host (random numbers drawn inside the jitted loop would cost seconds
  of compilation), and the training is one jitted scan.
  """
  s = settings
  x, y = _train_pixels()
  params = _init_params(s)
  rng = np.random.default_rng([s.seed, 1])
  batches = rng.integers(0, x.shape[0], (s.steps, s.batch_size)).astype(np.int32)
  noise = rng.standard_normal((s.steps, s.batch_size, _PIXELS), np.float32)
  targets = np.full((y.shape[0], DIGITS_NUM_CLASSES), s.label_smoothing / DIGITS_NUM_CLASSES,
                    np.float32)
  targets[np.arange(y.shape[0]), y] += 1.0 - s.label_smoothing
  with jax.default_device(_cpu()):
    params = _train(params, jnp.asarray(x), jnp.asarray(targets), jnp.asarray(batches),
                    jnp.asarray(noise), hidden=s.hidden, features=s.features,
                    learning_rate=s.learning_rate, weight_decay=s.weight_decay,
                    input_noise=s.input_noise)
  return jax.tree.map(np.asarray, jax.device_get(params))


@functools.partial(jax.jit, static_argnames=("hidden", "features"))
def _apply(params, x, hidden, features):
  return DigitsClassifier(hidden, features).apply({"params": params}, x)


class DigitsMetric:
  """The trained classifier plus the statistics of the real digits it is compared with.

  Build with `load_or_train` (cached) or `DigitsMetric(train_classifier(s), s)`;
  the statistics and reference scores are computed when not given.

  Attributes:
    params: classifier parameters (numpy pytree).
    settings: ClassifierSettings they were trained with.
    mu, sigma: mean [F] and covariance [F, F] of the train images' features.
    reference: the scores of the 355 held-out real images ('digits_fd_floor',
      'digits_confident', ...): what a perfect generator would get.
  """

  def __init__(self, params: Dict[str, Any], settings: ClassifierSettings,
               mu: Optional[np.ndarray] = None, sigma: Optional[np.ndarray] = None,
               reference: Optional[Dict[str, float]] = None):
    self.params = params
    self.settings = settings
    if mu is None or sigma is None:
      mu, sigma = metrics.stats_from_features(self.features(load_digits("train")[0])[0])
    self.mu, self.sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if reference is None:
      images, labels = load_digits("test")
      reference = self.scores(images, labels)
      reference["digits_fd_floor"] = reference.pop("digits_fd")
      for key in ("digits_class_counts", f"digits_fd_{HELD_OUT_SIZE}"):
        reference.pop(key)
    self.reference = dict(reference)

  @property
  def floor(self) -> float:
    """digits FD of the held-out real images against the train images."""
    return float(self.reference["digits_fd_floor"])

  def features(self, images: np.ndarray, batch_size: int = 4096) -> Tuple[np.ndarray, np.ndarray]:
    """(features float64 [N, F], logits float64 [N, 10]) of images (module docstring)."""
    x = to_unit_pixels(images)
    feats, logits = [], []
    with jax.default_device(_cpu()):
      for start in range(0, x.shape[0], batch_size):
        f, l = _apply(self.params, jnp.asarray(x[start:start + batch_size]),
                      self.settings.hidden, self.settings.features)
        feats.append(np.asarray(f, np.float64))
        logits.append(np.asarray(l, np.float64))
    if not feats:
      raise ValueError("no images")
    return np.concatenate(feats), np.concatenate(logits)

  def fd(self, images: np.ndarray) -> float:
    """digits FD of images against the train half (>= 2 images)."""
    return self._fd(self.features(images)[0])

  def _fd(self, feats: np.ndarray) -> float:
    return metrics.fid_from_stats(*metrics.stats_from_features(feats), self.mu, self.sigma)

  def scores(self, images: np.ndarray, labels: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """All the numbers of the module docstring for a set of images.

    Args:
      images: [N, H, W(, 1)] uint8 or floats in [0, 1], N >= 2.
      labels: int [N], the classes a class-conditional model was asked for
        (adds 'digits_label_accuracy'); None for unconditional samples.
    Returns:
      {'digits_fd', 'digits_confident', 'digits_classifier_score',
       'digits_class_balance', 'digits_class_counts' (list of 10 ints)
       [, 'digits_fd_355' if N >= 355][, 'digits_label_accuracy']}.
    """
    feats, logits = self.features(images)
    fd = self._fd
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    pred = p.argmax(axis=1)
    counts = np.bincount(pred, minlength=DIGITS_NUM_CLASSES)
    freq = counts / counts.sum()
    nz = freq[freq > 0]
    out: Dict[str, Any] = {
        "digits_fd": fd(feats),
        "digits_confident": float(np.mean(p.max(axis=1) > CONFIDENCE_THRESHOLD)),
        "digits_classifier_score": metrics.inception_score(logits)[0],
        "digits_class_balance": float(-(nz * np.log(nz)).sum() / np.log(DIGITS_NUM_CLASSES)),
        "digits_class_counts": [int(c) for c in counts],
    }
    chunks = feats.shape[0] // HELD_OUT_SIZE
    if chunks:
      out[f"digits_fd_{HELD_OUT_SIZE}"] = float(np.mean(
          [fd(feats[k * HELD_OUT_SIZE:(k + 1) * HELD_OUT_SIZE]) for k in range(chunks)]))
    if labels is not None:
      labels = np.asarray(labels).reshape(-1)
      if labels.shape[0] != pred.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {pred.shape[0]} images")
      out["digits_label_accuracy"] = float(np.mean(pred == labels))
    return out


def _flatten(params: Dict[str, Any]) -> Dict[str, np.ndarray]:
  flat = traverse_util.flatten_dict(params)
  return {"params/" + "/".join(k): np.asarray(v) for k, v in flat.items()}


def _unflatten(arrays: Dict[str, np.ndarray]) -> Dict[str, Any]:
  flat = {tuple(k.split("/")[1:]): v for k, v in arrays.items() if k.startswith("params/")}
  return traverse_util.unflatten_dict(flat)


def load_or_train(cache_path: Optional[str] = None,
                  settings: ClassifierSettings = ClassifierSettings(), *,
                  write: bool = True) -> DigitsMetric:
  """The metric, from `cache_path` if it holds one trained with `settings`, else trained anew.

  Args:
    cache_path: an .npz (e.g. WORKDIR/eval/digits_classifier.npz); None: no cache.
    settings: training settings (their fingerprint is stored in the file; a
      file with another fingerprint is retrained and overwritten).
    write: save a newly trained classifier to cache_path (atomically: a temporary
      name renamed into place). Pass False on all but one process.
  """
  if cache_path and os.path.exists(cache_path):
    try:
      with np.load(cache_path, allow_pickle=False) as f:
        arrays = {k: np.asarray(f[k]) for k in f.files}
      if str(arrays["fingerprint"]) == settings.fingerprint():
        reference = json.loads(str(arrays["reference"]))
        return DigitsMetric(_unflatten(arrays), settings, arrays["mu"], arrays["sigma"], reference)
      logging.info("%s was trained with other settings; retraining the digits classifier.",
                   cache_path)
    except (OSError, KeyError, ValueError) as e:
      logging.warning("Unreadable digits classifier cache %s (%s); retraining.", cache_path, e)
  metric = DigitsMetric(train_classifier(settings), settings)
  if cache_path and write:
    plotting.save_arrays(cache_path, fingerprint=np.asarray(settings.fingerprint()),
                         reference=np.asarray(json.dumps(metric.reference)), mu=metric.mu,
                         sigma=metric.sigma, **_flatten(metric.params))
  return metric


@functools.lru_cache(maxsize=1)
def default_metric() -> DigitsMetric:
  """The metric with the default settings, trained once per process (no file)."""
  return load_or_train(None)


def digits_fd(samples: np.ndarray, metric: Optional[DigitsMetric] = None) -> float:
  """digits FD of samples (module docstring); compare with `metric.floor`."""
  return (metric or default_metric()).fd(samples)
