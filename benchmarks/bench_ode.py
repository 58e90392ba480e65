"""Error against NFE of the adaptive probability-flow solve, and scipy's RK45.

The 2021 reference integrates the probability-flow ODE with
`scipy.integrate.solve_ivp(method="RK45")` over the whole batch flattened
into one vector. This compares that, run on the host, with
`probability_flow.solve` in several configurations (Runge-Kutta pair,
I or PI controller, error norm over the batch or per example, first step),
on the exact score of the 2-D mixture `analytic.example_mixture_2d` (the
target of bench_samplers.py), in float64, for both directions:

  sampling    x from T to eps; error: RMS over the batch of x - x_ref.
  likelihood  (x, log-density change) from eps to T with the exact
              divergence; error: mean |log p - log p_ref| in nats.

The reference solution is scipy's DOP853 at rtol = atol = 1e-12 (its
likelihood also checked against the closed form). Each cell is
"NFE / error"; the last table gives, per configuration, the NFE it needs
to reach RK45's error at each tolerance (log-log interpolation between its
own tolerances), as a ratio to RK45's NFE.

  python benchmarks/bench_ode.py [--samples 2000] [--sde vp ve]
      [--tols 1e-2 1e-3 1e-4 1e-5] [--seed 0]

With --network DIR (a genuine score_sde_pytorch checkpoint of
tests/data/reference, e.g. tests/data/reference/ddpmpp_continuous) it
instead counts NFE on that converted network in float32, batch 16, at
rtol = atol = 1e-3, for sampling and bits/dim, over 5 batches (--batches):
score_jax's solve against scipy's RK45 driving the same JAX network.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from score_jax.run import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # main.py's CPU compiler settings, before JAX starts

import jax

# float64 for the analytic tables (errors down to 1e-7), float32 on a network.
jax.config.update("jax_enable_x64", "--network" not in sys.argv)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from scipy import integrate  # noqa: E402

from score_jax import analytic, likelihood
from score_jax.samplers import probability_flow  # noqa: E402
from score_jax import sde as sde_lib  # noqa: E402
from score_jax.samplers._common import full_t  # noqa: E402
from score_jax.samplers.probability_flow import Method  # noqa: E402

MIX = analytic.example_mixture_2d()
SDES = {  # as in bench_samplers.py: (sde, eps)
    "vp": (sde_lib.VPSDE(0.1, 20.0, 1000), 1e-3),
    "ve": (sde_lib.VESDE(0.01, 50.0, 1000), 1e-5),
}
METHODS = {
    "Tsit5, diffrax I, first step 1% (previous default)": Method(
        solver="tsit5", controller="diffrax", first_step=0.01),
    "Tsit5, diffrax I, auto first step": Method(solver="tsit5", controller="diffrax"),
    "Dopri5 (Shampine's error estimate: diffrax.Dopri5), diffrax I, auto first step": Method(
        solver="dopri5_shampine", controller="diffrax"),
    "Dopri5, RK45 rule, auto first step (default)": Method(),
    "Tsit5, RK45 rule, auto first step": Method(solver="tsit5"),
    "Bosh3, RK45 rule, auto first step": Method(solver="bosh3"),
    "Dopri5, RK45 rule + PI (0.4, 0.3), auto first step": Method(pcoeff=0.4, icoeff=0.3),
    "Tsit5, RK45 rule + PI (0.4, 0.3), auto first step": Method(solver="tsit5", pcoeff=0.4,
                                                                 icoeff=0.3),
    "Dopri5, RK45 rule, auto first step, per-example norm": Method(norm="example"),
}
RK45 = "scipy RK45 (reference, host)"


def problem(sde, eps, direction, n, seed, score_fn=None):
  """(vector_field, y0, t0, t1) of the probability-flow ODE in one direction."""
  score_fn = score_fn or analytic.score_fn(MIX, sde)
  if direction == "sampling":
    y0 = sde.prior_sampling(jax.random.PRNGKey(seed), (n, MIX.dim))
    field = lambda t, x: probability_flow.drift(sde, score_fn, x, full_t(t, n))
    return field, y0, sde.T, eps
  x, _ = MIX.sample(jax.random.PRNGKey(seed), n)

  def field(t, state):
    drift = lambda v: probability_flow.drift(sde, score_fn, v, full_t(t, n))
    return likelihood._divergence_fn(drift, state[0], None)

  return field, (x, jnp.zeros((n,), x.dtype)), eps, sde.T


def scipy_solve(field, y0, t0, t1, method, tol):
  """solve_ivp over the flattened state, the reference's way: (y1 pytree, nfev)."""
  flat0, unravel = ravel_pytree(y0)
  flat_field = jax.jit(lambda t, y: ravel_pytree(field(t, unravel(y)))[0])
  fun = lambda t, y: np.asarray(flat_field(jnp.asarray(t, flat0.dtype), jnp.asarray(y)))
  sol = integrate.solve_ivp(fun, (float(t0), float(t1)), np.asarray(flat0), method=method,
                            rtol=tol, atol=tol)
  if not sol.success:
    raise RuntimeError(sol.message)
  return unravel(jnp.asarray(sol.y[:, -1], flat0.dtype)), int(sol.nfev)


def jax_solver(field, t0, t1, method):
  """jitted (y0, tol) -> (y1, nfe) of probability_flow.solve; one compile per method."""
  return jax.jit(lambda y0, tol: probability_flow.solve(field, y0, t0, t1, tol, tol,
                                                        method=method))


def error_fn(direction, ref):
  if direction == "sampling":
    return lambda y: float(jnp.sqrt(jnp.mean((y - ref)**2)))
  return lambda y: float(jnp.mean(jnp.abs(y[1] - ref[1])))


def fitted_nfe(nfes, errs, target):
  """NFE at which a method's error reaches target, from a least-squares power law
  log NFE = a + b log error fitted over all its tolerances (smooths the step-count jumps)."""
  b, a = np.polyfit(np.log(np.asarray(errs)), np.log(np.asarray(nfes, float)), 1)
  return float(np.exp(a + b * np.log(target)))


def table(name, direction, n, tols, seed):
  sde, eps = SDES[name]
  field, y0, t0, t1 = problem(sde, eps, direction, n, seed)
  ref, ref_nfe = scipy_solve(field, y0, t0, t1, "DOP853", 1e-12)
  title = f"{name.upper()} SDE, {direction}, {n} points"
  if direction == "likelihood":
    ones = jnp.ones((n,))
    x, z = y0[0], ref[0]
    exact = (analytic.log_prob(MIX, sde, x, eps * ones) - analytic.log_prob(MIX, sde, z, t1 * ones))
    title += (f"; reference (DOP853, 1e-12, {ref_nfe} NFE) vs closed form: "
              f"{float(jnp.max(jnp.abs(ref[1] - exact))):.1e} nats")
  err = error_fn(direction, ref)
  # The fit runs over four tolerances per decade; the first table shows the decades.
  grid = sorted({*tols, *np.geomspace(max(tols), min(tols), 4 * DECADES(tols) + 1)},
                reverse=True)
  rows = {RK45: [scipy_solve(field, y0, t0, t1, "RK45", tol) for tol in grid]}
  for label, method in METHODS.items():
    run = jax_solver(field, t0, t1, method)
    rows[label] = [run(y0, tol) for tol in grid]
  results = {k: ([int(nfe) for _, nfe in v], [err(y) for y, _ in v]) for k, v in rows.items()}
  shown = [grid.index(t) for t in tols]
  print(f"\n### {title}\n\nNFE / error at rtol = atol:\n")
  print("| method | " + " | ".join(f"{t:g}" for t in tols) + " |")
  print("|---|" + "---|" * len(tols))
  for label, (nfes, errs) in results.items():
    print(f"| {label} | " + " | ".join(f"{nfes[i]} / {errs[i]:.1e}" for i in shown) + " |")
  base_nfes, base_errs = results[RK45]
  print(f"\nNFE to reach RK45's error at rtol = atol = {tols[0]:g} ... {tols[-1]:g} "
        f"({len(grid)} tolerances), from power-law fits, as a ratio to RK45's:\n")
  print("| method | " + " | ".join(f"RK45 err {base_errs[i]:.0e}" for i in shown) + " |")
  print("|---|" + "---|" * len(tols))
  for label, (nfes, errs) in results.items():
    if label != RK45:
      cells = [fitted_nfe(nfes, errs, base_errs[i]) / fitted_nfe(base_nfes, base_errs,
                                                                 base_errs[i]) for i in shown]
      print(f"| {label} | " + " | ".join(f"{c:.2f}" for c in cells) + " |", flush=True)


DECADES = lambda tols: int(round(np.log10(max(tols) / min(tols))))


def load_network(directory):
  """(sde, score_fn, centered, image shape) of a genuine reference checkpoint directory.

  Its config: the score_jax paper config of the reference config it shrinks,
  with the changes in tests/data/reference/manifest.json.
  """
  import importlib
  import json
  import os

  from score_jax.convert import reference as convert
  from score_jax.run import builders
  from score_jax.models import get_score_fn
  from score_jax.run.settings import from_config

  name = os.path.basename(os.path.normpath(directory))
  with open(os.path.join(os.path.dirname(os.path.normpath(directory)), "manifest.json")) as f:
    entry = json.load(f)["networks"][name]
  paper = {"configs.vp.cifar10_ddpmpp_continuous": "vp_cifar",
           "configs.ve.cifar10_ncsnpp_continuous": "ve_cifar"}[entry["reference_config"]]
  config = importlib.import_module(f"configs.{paper}").get_config()
  with config.unlocked():
    for key, value in entry["changes"].items():
      section, field = key.split(".")
      config[section][field] = tuple(value) if isinstance(value, list) else value
  settings = from_config(config)
  spec = convert.reference_spec(config, "pytorch")
  tensors, _, _ = convert.load_reference(os.path.join(directory, entry["checkpoint"]), spec)
  model, sde = builders.get_model(settings), builders.get_sde(settings)
  variables = {"params": convert.tensors_to_params(tensors, spec)}
  score_fn = get_score_fn(sde, model, variables, continuous=bool(config.training.continuous))
  shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
  return sde, score_fn, bool(config.data.centered), shape


def network_table(directory, n, tol, seeds):
  """NFE on a converted genuine reference network, float32, at one tolerance.

  Over several batches: on a rough network a float32 rounding difference in
  the state moves accept / reject decisions, so single counts scatter.
  """
  from score_jax import samplers as sampling
  from score_jax.data.digits import load_digits
  from score_jax.data.scaling import data_scaler

  sde, score_fn, centered, shape = load_network(directory)
  eps_sample, eps_lik = 1e-3, 1e-5  # the reference's defaults
  previous = METHODS["Tsit5, diffrax I, first step 1% (previous default)"]
  sample_field = lambda t, x: probability_flow.drift(sde, score_fn, x, full_t(t, n))

  def lik_field(probe):
    def field(t, state):
      drift = lambda v: probability_flow.drift(sde, score_fn, v, full_t(t, n))
      return likelihood._divergence_fn(drift, state[0], probe)
    return field

  old_sample = jax.jit(lambda z: probability_flow.solve(
      sample_field, z, jnp.float32(sde.T), jnp.float32(eps_sample), tol, tol, method=previous))
  old_lik = jax.jit(lambda s, probe: probability_flow.solve(
      lik_field(probe), s, jnp.float32(eps_lik), jnp.float32(sde.T), tol, tol, method=previous))
  digits = load_digits("test")[0]
  counts = {"sampling (T -> eps)": [], "bits/dim (eps -> T)": []}
  for seed in seeds:
    # Sampling, T -> eps, no denoising step (the reference's nfev counts the solve).
    z = sde.prior_sampling(jax.random.PRNGKey(seed), (n,) + shape)
    counts["sampling (T -> eps)"].append((
        scipy_solve(sample_field, z, sde.T, eps_sample, "RK45", tol)[1], int(old_sample(z)[1]),
        int(sampling.ode_sample(None, sde, score_fn, z.shape, rtol=tol, atol=tol,
                                denoise=False, eps=eps_sample, z=z)[1])))
    # Bits/dim of digits (8x8, tiled over the channels), Rademacher probe; scipy
    # and the previous solve get bits_per_dim's ODE: its dequantization and probe.
    batch = digits[seed * n:(seed + 1) * n]
    images = np.broadcast_to(batch[:, :shape[0], :shape[1]], (n,) + shape)
    rng = jax.random.PRNGKey(1000 + seed)
    deq_rng, probe_rng = jax.random.split(rng)
    x = data_scaler(centered)(likelihood.dequantize(deq_rng, jnp.asarray(images)))
    probe = jax.random.rademacher(probe_rng, x.shape, x.dtype)
    state0 = (x, jnp.zeros((n,), x.dtype))
    counts["bits/dim (eps -> T)"].append((
        scipy_solve(lik_field(probe), state0, eps_lik, sde.T, "RK45", tol)[1],
        int(old_lik(state0, probe)[1]),
        int(likelihood.bits_per_dim(rng, sde, score_fn, images, centered, rtol=tol, atol=tol,
                                    eps=eps_lik)[2])))
  print(f"\n### NFE on {directory}, batch {n}, rtol = atol = {tol:g}, float32, "
        f"mean (min-max) over {len(seeds)} batches\n")
  labels = [RK45, "previous: Tsit5, diffrax I, first step 1%", "default (ode_sample / bits_per_dim)"]
  print("| solve | " + " | ".join(labels) + " |")
  print("|---|" + "---|" * len(labels))
  for label, rows in counts.items():
    cells = [f"{np.mean(c):.0f} ({min(c)}-{max(c)})" for c in zip(*rows)]
    print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sde", nargs="+", choices=sorted(SDES), default=["vp", "ve"])
  parser.add_argument("--samples", type=int, default=2000)
  parser.add_argument("--tols", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4, 1e-5])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--directions", nargs="+", choices=["sampling", "likelihood"],
                      default=["sampling", "likelihood"])
  parser.add_argument("--network", metavar="DIR",
                      help="a genuine reference checkpoint directory: count NFE on it instead")
  parser.add_argument("--batch", type=int, default=16, help="batch on --network")
  parser.add_argument("--tol", type=float, default=1e-3, help="rtol = atol on --network")
  parser.add_argument("--batches", type=int, default=5, help="batches on --network")
  args = parser.parse_args()
  start = time.time()
  if args.network:
    network_table(args.network, args.batch, args.tol, range(args.seed, args.seed + args.batches))
    args.sde = []
  for name in args.sde:
    for direction in args.directions:
      table(name, direction, args.samples, args.tols, args.seed)
  print(f"\n({time.time() - start:.0f} s on {jax.devices()[0].platform})")


if __name__ == "__main__":
  main()
