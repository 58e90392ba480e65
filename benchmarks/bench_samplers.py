"""Sampler accuracy against NFE, and likelihood error against tolerance.

Ground truth is closed form (score_jax.analytic): the exact score of the
2-D Gaussian mixture `example_mixture_2d` under the chosen SDE. For each
sampler and budget of score evaluations (NFE) it prints the largest error
of the per-component weights, means and (relative) standard deviations of
the samples, and for deterministic solvers the RMS distance to a tight
(rtol = 1e-7) probability-flow ODE solution from the same latents. Sampling
error alone (20k samples) is about 0.01 in weight and mean and 1.3% in std
(2 standard errors). Then the likelihood table: exact-trace log p error in
nats against the closed form, and NFE, per solver tolerance.

  python benchmarks/bench_samplers.py [--sde vp|subvp|ve|rf] [--samples 20000]
      [--nfe 10 20 ...] [--samplers UniPC DPM ...]
"""

from __future__ import annotations

import argparse
import time

from score_jax.run import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # main.py's CPU compiler settings, before JAX starts

import jax
import jax.numpy as jnp
import numpy as np

from score_jax import analytic, likelihood
from score_jax.samplers import fast as fast_samplers
from score_jax import samplers as sampling
from score_jax.samplers import time_grids
from score_jax import sde as sde_lib

SDES = {
    "vp": (lambda n: sde_lib.VPSDE(0.1, 20.0, n), 1e-3),
    "subvp": (lambda n: sde_lib.subVPSDE(0.1, 20.0, n), 1e-3),
    "ve": (lambda n: sde_lib.VESDE(0.01, 50.0, n), 1e-5),
    "rf": (lambda n: sde_lib.RectifiedFlow(N=n), 1e-3),
}


def pc(predictor, corrector, calls_per_step):
  """A PC sampler at a given NFE: N = NFE / calls_per_step steps."""

  def run(make_sde, eps, key, shape, nfe, z):
    sde = make_sde(max(nfe // calls_per_step, 1))
    return sampling.pc_sample(key, sde, analytic.score_fn(MIX, sde), shape, predictor, corrector,
                              eps=eps, z=z)

  return run, False


def fast(fn, nfe_to_steps, deterministic, **kwargs):

  def run(make_sde, eps, key, shape, nfe, z):
    sde = make_sde(1000)
    return fn(key, sde, analytic.score_fn(MIX, sde), shape, nfe_to_steps(nfe), eps=eps, z=z,
              **kwargs)

  return run, deterministic


def optimized(order, variant, batch=4096, iters=300):
  """UniPC on a grid fitted by time_grids.optimize_time_grid (other latents, same score)."""

  def run(make_sde, eps, key, shape, nfe, z):
    sde = make_sde(1000)
    score_fn = analytic.score_fn(MIX, sde)
    ts, _ = time_grids.optimize_time_grid(jax.random.fold_in(key, 1), sde, score_fn,
                                             (batch,) + shape[1:], nfe, order=order,
                                             variant=variant, eps=eps, iters=iters)
    return fast_samplers.unipc_sample(key, sde, score_fn, shape, order=order, variant=variant,
                                      z=z, timesteps=ts)

  return run, True


MIX = analytic.example_mixture_2d()
SAMPLERS = {
    "EM (PC: euler_maruyama, none)": pc("euler_maruyama", "none", 1),
    "PC: reverse_diffusion + langevin": pc("reverse_diffusion", "langevin", 2),
    "PC: ancestral_sampling, none": pc("ancestral_sampling", "none", 1),
    "DDIM eta=0 (logSNR)": fast(fast_samplers.ddim_sample, lambda n: n, True, schedule="logSNR"),
    "DDIM eta=1 (logSNR)": fast(fast_samplers.ddim_sample, lambda n: n, False, eta=1.0,
                                schedule="logSNR"),
    "Heun (edm rho=7)": fast(fast_samplers.heun_sample, lambda n: n // 2, True),
    "Heun churn=20 (edm)": fast(fast_samplers.heun_sample, lambda n: n // 2, False, s_churn=20.0),
    "DPM-Solver++ 2M (logSNR)": fast(fast_samplers.dpm_solver_pp_sample, lambda n: n, True),
    "DPM-Solver++ 3M (logSNR)": fast(fast_samplers.dpm_solver_pp_sample, lambda n: n - 1, True,
                                     order=3),
    **{f"UniPC-{order} {variant} (logSNR)": fast(fast_samplers.unipc_sample, lambda n: n, True,
                                                 order=order, variant=variant)
       for order in (2, 3) for variant in ("bh1", "bh2")},
    "UniPC-2 bh2 (optimized grid)": optimized(2, "bh2"),
    "UniPC-3 bh1 (optimized grid)": optimized(3, "bh1"),
}


def errors(sde, x):
  target = MIX.at(sde, 0.0)
  st = analytic.mode_statistics(MIX, x)
  std = jnp.sqrt(jnp.einsum("kdd->kd", target.covs))
  return (float(jnp.abs(st.weights - target.weights).max()),
          float(jnp.abs(st.means - target.means).max()),
          float(jnp.abs(st.stds / std - 1).max()))


def sampler_table(name: str, n: int, nfes, seed: int, only=None) -> None:
  make_sde, eps = SDES[name]
  sde = make_sde(1000)
  shape = (n, 2)
  z = sde.prior_sampling(jax.random.PRNGKey(seed), shape)
  ref, ref_nfe = sampling.ode_sample(None, sde, analytic.score_fn(MIX, sde), shape, rtol=1e-7,
                                     atol=1e-7, denoise=False, eps=eps, z=z)
  print(f"\n### Samplers on the 2-D mixture, {name.upper()} SDE, {n} samples "
        f"(reference ODE: rtol 1e-7, {int(ref_nfe)} NFE)\n")
  print("| sampler | NFE | weight err | mean err | std err % | path RMS vs ODE |")
  print("|---|---|---|---|---|---|")
  for label, (run, deterministic) in SAMPLERS.items():
    if only and not any(word.lower() in label.lower() for word in only):
      continue
    for nfe in nfes:
      try:
        x, used = run(make_sde, eps, jax.random.PRNGKey(seed + 1), shape, nfe, z)
      except ValueError as e:  # e.g. a DDPM chain with N <= beta_max
        print(f"| {label} | {nfe} | n/a: {str(e).split(';')[0]} | | | |")
        continue
      w, m, s = errors(sde, x)
      path = f"{float(jnp.sqrt(jnp.mean((x - ref)**2))):.2e}" if deterministic else "-"
      print(f"| {label} | {int(used)} | {w:.4f} | {m:.4f} | {100 * s:.2f} | {path} |", flush=True)
  for tol in (1e-3, 1e-5):
    x, used = sampling.ode_sample(jax.random.PRNGKey(seed + 1), sde, analytic.score_fn(MIX, sde),
                                  shape, rtol=tol, atol=tol, eps=eps, z=z)
    w, m, s = errors(sde, x)
    path = float(jnp.sqrt(jnp.mean((x - ref)**2)))
    print(f"| ODE (RK45) rtol=atol={tol:g} (+denoise) | {int(used)} | {w:.4f} | {m:.4f} | "
          f"{100 * s:.2f} | {path:.2e} |", flush=True)


def likelihood_table(n: int, seed: int) -> None:
  print(f"\n### Likelihood (exact trace) vs solver tolerance, {n} points, eps = 1e-5\n")
  print("| SDE | rtol = atol | max abs err (nats) | mean abs err | NFE |")
  print("|---|---|---|---|---|")
  x, _ = MIX.sample(jax.random.PRNGKey(seed), n)
  for name, (make_sde, _) in SDES.items():
    sde = make_sde(1000)
    for tol in (1e-3, 1e-4, 1e-5, 1e-6):
      logp, z, nfe = likelihood.log_likelihood(None, sde, analytic.score_fn(MIX, sde), x, "exact",
                                               rtol=tol, atol=tol)
      ones = jnp.ones((n,))
      # What the method computes exactly: log p_eps(x) plus the prior mismatch at z.
      exact = (analytic.log_prob(MIX, sde, x, 1e-5 * ones) + sde.prior_logp(z) -
               analytic.log_prob(MIX, sde, z, sde.T * ones))
      err = np.abs(np.asarray(logp - exact))
      print(f"| {name} | {tol:g} | {err.max():.2e} | {err.mean():.2e} | {int(nfe)} |", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sde", choices=sorted(SDES), default="vp")
  parser.add_argument("--samples", type=int, default=20_000)
  parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50, 100, 1000])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--skip-likelihood", action="store_true")
  parser.add_argument("--samplers", nargs="+", metavar="WORD",
                      help="only the samplers whose label contains one of these words")
  args = parser.parse_args()
  start = time.time()
  sampler_table(args.sde, args.samples, args.nfe, args.seed, args.samplers)
  if not args.skip_likelihood:
    likelihood_table(256, args.seed)
  print(f"\n({time.time() - start:.0f} s on {jax.devices()[0].platform})")


if __name__ == "__main__":
  main()
