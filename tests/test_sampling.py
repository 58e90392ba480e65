"""Samplers against closed-form Gaussian-mixture marginals (score_jax.analytic).

Statistical tolerances. With n samples and n_k = w_k n of them in component
k, the per-component estimators have standard errors sqrt(w (1 - w) / n)
(weight), sigma / sqrt(n_k) (mean) and sigma / sqrt(2 n_k) (standard
deviation of Gaussian data). Every check allows Z = 4.5 standard errors
(two-sided p = 7e-6 per statistic, below 1e-2 for the ~1000 statistics of
this file) plus a stated bias allowance for the sampler's discretization,
measured with 40,000 samples (standard errors ~4x smaller than here).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import analytic
from score_jax.samplers import fast as fast_samplers
from score_jax.samplers import probability_flow
from score_jax import samplers as sampling
from score_jax.samplers import ode, pc
from score_jax import sde as sde_lib

from helpers import (EPS, N_PC, ODE_BIAS, PC_BIAS, SDES, Z, Bias,  # noqa: F401
                     assert_reproduces, mixture_setup as setup)

N_SAMPLES = 4000
KEY = jax.random.PRNGKey(0)

# --- predictor-corrector ---

COMBOS = [(p, c) for p in pc.PREDICTORS for c in pc.CORRECTORS
          if not p == c == "none"]

# Corrector-only sampling needs several Langevin steps per noise level: one
# step contracts the excess variance by at most snr^2 (2.6% at snr 0.16)
# while the VE grid shrinks the variance by 3.4% per level at N = 300, so a
# single step lags (measured: stds 20-50% too large). Five steps per level
# (the paper's "C" samplers run 1000-2000 levels), and for ALD the NCSN step
# 2 (0.5 std)^2, bring them to a few percent.
CORRECTOR_ONLY = {"langevin": dict(n_steps=5, snr=0.16), "ald": dict(n_steps=5, snr=0.5)}
# ALD's step 2 (snr std(t))^2 vanishes as std(t)^2 near t = 0 while the VP /
# sub-VP modes still move with alpha(t); sub-VP's std (1 - e^-B ~ B instead
# of sqrt(B)) makes the steps far smaller, so its chain lags the moving means
# by 0.04-0.09 (measured with 20k samples, any snr / n_steps tried). This is
# the algorithm, not an implementation error; the allowance covers it.
CORRECTOR_ONLY_BIAS = {
    ("langevin", "vp"): Bias(0.02, 0.025, 0.05),
    ("langevin", "subvp"): Bias(0.02, 0.025, 0.05),
    ("langevin", "ve"): Bias(0.02, 0.025, 0.05),
    ("ald", "vp"): Bias(0.02, 0.04, 0.07),
    ("ald", "subvp"): Bias(0.02, 0.12, 0.05),
    ("ald", "ve"): Bias(0.02, 0.025, 0.05),
}


@pytest.mark.parametrize("predictor,corrector", COMBOS)
@pytest.mark.parametrize("name", sorted(SDES))
def test_pc_sampler_reproduces_mixture(name, predictor, corrector):
  sde, mix, score_fn = setup(name)
  kwargs, bias = {}, PC_BIAS
  if predictor == "none":
    kwargs, bias = CORRECTOR_ONLY[corrector], CORRECTOR_ONLY_BIAS[corrector, name]
  x, nfe = sampling.pc_sample(jax.random.PRNGKey(1), sde, score_fn, (N_SAMPLES, 2), predictor,
                              corrector, eps=EPS[name], **kwargs)
  n_steps = kwargs.get("n_steps", 1)
  assert nfe == N_PC * ((predictor != "none") + n_steps * (corrector != "none"))
  assert_reproduces(mix, sde, x, bias)


def test_single_step_corrector_only_sampling_lags_and_the_check_catches_it():
  # The check above can fail: ALD with one step per level on VE (the
  # settings rejected in CORRECTOR_ONLY) leaves the mixture far off.
  sde, mix, score_fn = setup("ve")
  x, _ = sampling.pc_sample(jax.random.PRNGKey(1), sde, score_fn, (N_SAMPLES, 2), "none", "ald",
                            eps=EPS["ve"])
  with pytest.raises(AssertionError, match="off by"):
    assert_reproduces(mix, sde, x, CORRECTOR_ONLY_BIAS["ald", "ve"])


def test_pc_sampler_does_not_recompile_for_new_choices_or_parameters():
  sde, mix, score_fn = setup("vp")
  shape = (N_SAMPLES, 2)
  sampling.pc_sample(jax.random.PRNGKey(0), sde, score_fn, shape)
  compiled = pc._pc_sample._cache_size()
  # New SDE and mixture parameters, key, predictor, corrector, snr, n_steps
  # and eps are all traced: the same program runs.
  sde2 = sde_lib.VPSDE(0.2, 15.0, N_PC)
  mix2 = mix._replace(weights=jnp.array([0.3, 0.3, 0.4]))
  x, _ = sampling.pc_sample(jax.random.PRNGKey(1), sde2, analytic.score_fn(mix2, sde2), shape,
                            "ancestral_sampling", "ald", snr=0.3, n_steps=2, eps=1e-2)
  assert pc._pc_sample._cache_size() == compiled
  assert np.all(np.isfinite(np.asarray(x)))


# --- probability-flow ODE ---


@pytest.mark.parametrize("name", sorted(SDES))
def test_ode_sampler_reproduces_mixture(name):
  sde, mix, score_fn = setup(name)
  x, nfe = sampling.ode_sample(jax.random.PRNGKey(2), sde, score_fn, (N_SAMPLES, 2), eps=EPS[name])
  assert 20 < int(nfe) < 1000
  assert_reproduces(mix, sde, x, ODE_BIAS)


_calls = []


def _count_call():
  _calls.append(1)


def _counting_score(inner, x, t):
  jax.debug.callback(_count_call)
  return inner(x, t)


def test_ode_nfe_is_the_true_count_and_encoding_inverts_sampling():
  sde, mix, score_fn = setup("vp")
  x, _ = mix.sample(jax.random.PRNGKey(5), N_SAMPLES)
  _calls.clear()
  z, nfe = sampling.ode_encode(sde, jax.tree_util.Partial(_counting_score, score_fn), x)
  jax.block_until_ready(z)
  jax.effects_barrier()
  assert int(nfe) == len(_calls) > 0
  # Latents of the data are prior-like: N(0, 1) per coordinate.
  assert abs(float(jnp.std(z)) - 1.0) < 0.05
  back, nfe_back = sampling.ode_sample(KEY, sde, score_fn, x.shape, denoise=False, z=z)
  # Both solves run at rtol = atol = 1e-5; the flow expands near the
  # boundaries between modes, so a few points come back less accurately.
  err = np.abs(np.asarray(back - x))
  assert np.median(err) < 1e-4 and np.quantile(err, 0.999) < 2e-3 and err.max() < 1e-2, err.max()
  # Denoising is one more evaluation, in the same compiled program.
  compiled = ode._ode_sample._cache_size()
  _, nfe_denoised = sampling.ode_sample(KEY, sde, score_fn, x.shape, denoise=True, z=z)
  assert int(nfe_denoised) == int(nfe_back) + 1
  assert ode._ode_sample._cache_size() == compiled


@pytest.mark.parametrize("method", ["default", "tsit5_fraction"])
def test_ode_nfe_counts_a_rejected_first_step(method):
  # A score with a fast wiggle in t, as an imperfect network's can have, makes
  # the solver reject early steps. The default first step (Hairer-Wanner) costs
  # one evaluation beyond the first stage, which is then reused: 2 + 6 k. With
  # a fixed first step (1% of the interval) nothing is stored until a step is
  # accepted, so each rejected first attempt costs all 7 stages: then the count
  # is not 1 + 6 k. Either way it must equal the evaluations made.
  sde, mix, score_fn = setup("vp")
  wiggly = jax.tree_util.Partial(
      lambda f, x, t: f(x, t) + 30.0 * jnp.sin(300.0 * t)[:, None] * x, score_fn)
  counting = jax.tree_util.Partial(_counting_score, wiggly)
  z = sde.prior_sampling(KEY, (64, 2))
  _calls.clear()
  if method == "default":
    x, nfe = sampling.ode_sample(KEY, sde, counting, z.shape, denoise=False, z=z)
  else:
    field = lambda t, x: probability_flow.drift(sde, counting, x, jnp.full((64,), t))
    x, nfe = jax.jit(lambda z: probability_flow.solve(
        field, z, sde.T, EPS["vp"], 1e-5, 1e-5,
        method=probability_flow.Method("tsit5", "diffrax", first_step=0.01)))(z)
  jax.block_until_ready(x)
  jax.effects_barrier()
  assert int(nfe) == len(_calls)
  if method == "default":
    assert (int(nfe) - 2) % 6 == 0
  else:
    assert (int(nfe) - 1) % 6 != 0  # the first step was rejected: the case under test
  assert bool(jnp.all(jnp.isfinite(x)))


def _flat_solve_ivp(field, y0, t0, t1, method, tol):
  """scipy.integrate.solve_ivp over the flattened batch, as the 2021 reference calls it."""
  from scipy import integrate
  fun = jax.jit(lambda t, y: field(t, y.reshape(y0.shape)).reshape(-1))
  sol = integrate.solve_ivp(lambda t, y: np.asarray(fun(t, jnp.asarray(y, y0.dtype))),
                            (t0, t1), np.asarray(y0).reshape(-1), method=method, rtol=tol,
                            atol=tol)
  assert sol.success
  return sol.y[:, -1].reshape(y0.shape), sol.nfev


@pytest.mark.parametrize("name", ["vp", pytest.param("ve", marks=pytest.mark.slow)])
def test_ode_solve_costs_no_more_than_scipy_rk45_at_no_larger_error(name):
  """The adaptive solve against scipy's RK45 (the reference's solver) on the exact
  mixture score, rtol = atol = 1e-3, error (about 1e-2) against scipy's DOP853
  at 1e-8.

  The default is RK45's algorithm (Dormand-Prince weights, its step-size rule
  and first step), so it takes the same steps: at most one step (6 NFE) more,
  and an error within 10% (rounding: the field is float32, scipy's state
  float64, so a step-size decision can flip). diffrax.Dopri5, whose error
  estimate (Shampine's weights) is 2/3 as large, takes fewer steps and fails
  the error bound, with either controller.
  """
  sde, mix, score_fn = setup(name)
  z = sde.prior_sampling(jax.random.PRNGKey(3), (128, 2))
  field = lambda t, x: probability_flow.drift(sde, score_fn, x, jnp.full(x.shape[:1], t))
  t0, t1 = sde.T, EPS[name]
  ref, _ = _flat_solve_ivp(field, z, t0, t1, "DOP853", 1e-8)
  rk45, rk45_nfe = _flat_solve_ivp(field, z, t0, t1, "RK45", 1e-3)
  ours, nfe = jax.jit(lambda z: probability_flow.solve(field, z, t0, t1, 1e-3, 1e-3))(z)
  rms = lambda x: float(np.sqrt(np.mean((np.asarray(x, np.float64) - ref)**2)))
  assert int(nfe) <= rk45_nfe + 6, (int(nfe), rk45_nfe)
  assert rms(ours) <= 1.1 * rms(rk45), (rms(ours), rms(rk45))


def test_ode_solve_rejects_unknown_method_choices():
  field = lambda t, y: -y
  y0 = jnp.ones((2, 2))
  for bad, word in [(dict(solver="rk4"), "solver"), (dict(norm="max"), "norm"),
                    (dict(controller="pid"), "controller"), (dict(first_step=0.0), "first_step"),
                    (dict(first_step="heuristic"), "first_step")]:
    with pytest.raises(ValueError, match=word):
      probability_flow.solve(field, y0, 0.0, 1.0, 1e-3, 1e-3,
                             method=probability_flow.Method(**bad))


# --- fast samplers ---


def _gaussian_errors(sde, sampler, nfes):
  """Errors vs the exact ODE solution on a Gaussian, float64, for each NFE."""
  g = analytic.GaussianMixture.create([1.0], [[1.0, -0.5]], covs=[[[0.25, 0.1], [0.1, 0.16]]])
  score_fn = analytic.score_fn(g, sde)
  z = sde.prior_sampling(jax.random.PRNGKey(0), (64, 2))
  exact = analytic.gaussian_flow_map(g, sde, z, jnp.ones(64), jnp.full((64,), 1e-3))
  errors = []
  for nfe in nfes:
    x, used = sampler(sde, score_fn, z, nfe)
    assert used == nfe
    errors.append(float(jnp.sqrt(jnp.mean((x - exact)**2))))
  return np.asarray(errors)


def _ddim(sde, score_fn, z, nfe):
  return fast_samplers.ddim_sample(KEY, sde, score_fn, z.shape, nfe, schedule="logSNR", z=z)


def _heun(sde, score_fn, z, nfe):
  return fast_samplers.heun_sample(KEY, sde, score_fn, z.shape, nfe // 2, z=z)


def _dpm2(sde, score_fn, z, nfe):
  return fast_samplers.dpm_solver_pp_sample(KEY, sde, score_fn, z.shape, nfe, order=2, z=z)


def _dpm3(sde, score_fn, z, nfe):  # its first step costs one extra evaluation
  return fast_samplers.dpm_solver_pp_sample(KEY, sde, score_fn, z.shape, nfe - 1, order=3, z=z)


# (sampler, order, slack): the fitted slope of log error vs log NFE over NFE
# 32-128 must lie within slack of -order. Multistep 3M is superconvergent on
# a Gaussian (measured slope ~4: its h^3 error constant vanishes there), so
# it only has to reach order 3; order 2 of the widely copied 3M formula fails.
ORDERS = {"ddim": (_ddim, 1, 0.15), "heun": (_heun, 2, 0.25), "dpm2": (_dpm2, 2, 0.25),
          "dpm3": (_dpm3, 3, None)}


# The solvers only see alpha, std and lambda, so VP covers the code paths;
# the other SDEs run the order-sensitive cases by default and all with -m slow.
ORDER_CASES = [
    pytest.param(name, solver, marks=() if name == "vp" or
                 (name == "ve" and solver in ("dpm3", "heun")) else pytest.mark.slow)
    for name in sorted(SDES) for solver in sorted(ORDERS)
]


@pytest.mark.parametrize("name,solver", ORDER_CASES)
def test_fast_sampler_convergence_order(name, solver):
  sampler, order, slack = ORDERS[solver]
  nfes = [32, 64, 128]
  with jax.enable_x64(True):  # keeps the 3M errors (~1e-7) above round-off
    errors = _gaussian_errors(SDES[name](1000), sampler, nfes)
  slope = np.polyfit(np.log(nfes), np.log(errors), 1)[0]
  if slack is None:
    assert slope <= -order + 0.25, (slope, errors)
  else:
    assert abs(slope + order) <= slack, (slope, errors)


def test_fast_samplers_do_not_recompile_across_step_counts():
  sde, _, score_fn = setup("subvp")
  shape = (N_SAMPLES, 2)
  fast_samplers.dpm_solver_pp_sample(KEY, sde, score_fn, shape, 3)
  compiled = fast_samplers._dpm_pp._cache_size()
  for steps in (7, 12):
    fast_samplers.dpm_solver_pp_sample(KEY, sde, score_fn, shape, steps)
  assert fast_samplers._dpm_pp._cache_size() == compiled


def _fast(sampler, nfe, **kw):
  return {
      "ddim": lambda r, s, f, sh: fast_samplers.ddim_sample(r, s, f, sh, nfe, **kw),
      "heun": lambda r, s, f, sh: fast_samplers.heun_sample(r, s, f, sh, nfe // 2, **kw),
      "dpm": lambda r, s, f, sh: fast_samplers.dpm_solver_pp_sample(r, s, f, sh, nfe, **kw),
  }[sampler]


# Stochastic and deterministic fast samplers on the mixture. Largest biases
# measured with 100k samples on VP, sub-VP and VE: DPM-Solver++(2M) at 50 NFE
# 3.1% std, 0.007 mean; DDIM with eta = 1 (ancestral) at 200 logSNR steps
# 2.9% std; stochastic Heun (s_churn = 20) at 100 NFE 4.5% std, 0.008 mean.
FAST_CASES = {
    "dpm2_50": (_fast("dpm", 50), Bias(0.01, 0.015, 0.04)),
    "ddim_eta1_200": (_fast("ddim", 200, eta=1.0, schedule="logSNR"), Bias(0.01, 0.015, 0.04)),
    "heun_churn_100": (_fast("heun", 100, s_churn=20.0), Bias(0.01, 0.015, 0.05)),
}


FAST_DEFAULT = {("subvp", "dpm2_50"), ("ve", "heun_churn_100"), ("subvp", "ddim_eta1_200")}


@pytest.mark.parametrize("name,case", [
    pytest.param(name, case, marks=() if (name, case) in FAST_DEFAULT else pytest.mark.slow)
    for name in ("subvp", "ve") for case in sorted(FAST_CASES)
])
def test_fast_samplers_reproduce_mixture(name, case):
  run, bias = FAST_CASES[case]
  sde, mix, score_fn = setup(name)
  x, _ = run(jax.random.PRNGKey(6), sde, score_fn, (N_SAMPLES, 2))
  assert_reproduces(mix, sde, x, bias)


def test_dpm_solver_at_20_nfe_and_euler_maruyama_at_1000_steps():
  """The issue's bar: DPM-Solver++ at 20 NFE as accurate as 1000-step EM.

  Met at this suite's resolution (4000 samples resolve ~10% in std and ~0.05
  in mean): both pass the same check. Not met at 100k samples on this sharp
  mixture: EM-1000 has 0.8% std and 0.002 mean error, DPM-Solver++ at 20
  NFE 7.4% / 0.010 (2M) and 7.2% / 0.037 (3M); 3M needs ~50 NFE for 1.4%
  (benchmarks/bench_samplers.py prints the table). The excess is ~1% of
  samples left between modes by trajectories that split there (docs/results.md).
  """
  sde, mix, score_fn = setup("vp", 1000)
  shape = (N_SAMPLES, 2)
  bias = Bias(0.01, 0.04, 0.08)
  dpm, nfe = fast_samplers.dpm_solver_pp_sample(jax.random.PRNGKey(7), sde, score_fn, shape, 20)
  assert nfe == 20
  assert_reproduces(mix, sde, dpm, bias)
  em, nfe = sampling.pc_sample(jax.random.PRNGKey(7), sde, score_fn, shape, "euler_maruyama",
                               "none")
  assert nfe == 1000
  assert_reproduces(mix, sde, em, bias)


# --- argument checks ---


def test_bad_arguments_raise_clear_errors():
  sde, _, score_fn = setup("vp", 10)
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="valid: ancestral_sampling, euler_maruyama, none, "
                     "reverse_diffusion"):
    sampling.pc_sample(key, sde, score_fn, (4, 2), predictor="heun")
  with pytest.raises(ValueError, match="Unknown corrector 'hmc'; valid: ald, langevin, none"):
    sampling.pc_sample(key, sde, score_fn, (4, 2), corrector="hmc")
  with pytest.raises(ValueError, match="both be 'none'"):
    sampling.pc_sample(key, sde, score_fn, (4, 2), predictor="none", corrector="none")
  with pytest.raises(ValueError, match="probability-flow"):
    sampling.pc_sample(key, sde, score_fn, (4, 2), "ancestral_sampling", probability_flow=True)
  for eps in (0.0, -1e-3, 1.0, 2.0, math.nan):
    with pytest.raises(ValueError, match=r"eps must lie in \(0, T\)"):
      sampling.pc_sample(key, sde, score_fn, (4, 2), eps=eps)
    with pytest.raises(ValueError, match=r"eps must lie in \(0, T\)"):
      sampling.ode_sample(key, sde, score_fn, (4, 2), eps=eps)
    with pytest.raises(ValueError, match=r"eps must lie in \(0, T\)"):
      fast_samplers.ddim_sample(key, sde, score_fn, (4, 2), eps=eps)
  with pytest.raises(ValueError, match="z has shape"):
    sampling.pc_sample(key, sde, score_fn, (4, 2), z=jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match="z has shape"):
    fast_samplers.heun_sample(key, sde, score_fn, (4, 2), z=jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match="shape must be"):
    sampling.ode_sample(key, sde, score_fn, (4,))
  with pytest.raises(ValueError, match="N > beta_max"):
    sampling.pc_sample(key, sde, score_fn, (4, 2), "reverse_diffusion", "none")
  with pytest.raises(ValueError, match="N > beta_max"):
    sampling.pc_sample(key, sde_lib.subVPSDE(0.1, 20.0, 10), score_fn, (4, 2))
  with pytest.raises(ValueError, match="n_steps"):
    sampling.pc_sample(key, sde, score_fn, (4, 2), n_steps=0)
  with pytest.raises(ValueError, match="num_steps"):
    fast_samplers.dpm_solver_pp_sample(key, sde, score_fn, (4, 2), num_steps=0)
  with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
    fast_samplers.dpm_solver_pp_sample(key, sde, score_fn, (4, 2), order=4)
  with pytest.raises(ValueError, match="Unknown schedule 'cosine'; valid: edm, logSNR, uniform_t"):
    fast_samplers.ddim_sample(key, sde, score_fn, (4, 2), schedule="cosine")
  with pytest.raises(ValueError, match="eta"):
    fast_samplers.ddim_sample(key, sde, score_fn, (4, 2), eta=-1.0)
  with pytest.raises(TypeError, match="score_jax.sde.SDE"):
    sampling.pc_sample(key, "vp", score_fn, (4, 2))
  with pytest.raises(TypeError, match="constraint"):
    sampling.pc_sample(key, sde, score_fn, (4, 2), constraint=object())
  # A score of the wrong shape is caught when tracing.
  with pytest.raises(ValueError, match="score_fn returned shape"):
    sampling.pc_sample(key, setup("vp", 50)[0], lambda x, t: x[:, :1], (4, 2))
  with pytest.raises(ValueError, match="score_fn returned shape"):
    fast_samplers.dpm_solver_pp_sample(key, sde, lambda x, t: x.sum(), (4, 2))


def test_time_grids_run_from_T_to_eps():
  sde = sde_lib.VESDE(0.01, 50.0, 10)
  for schedule in fast_samplers.SCHEDULES:
    ts = np.asarray(fast_samplers.time_grid(sde, 8, schedule, eps=1e-5))
    assert ts.shape == (9,) and ts[0] == 1.0 and ts[-1] == np.float32(1e-5)
    assert np.all(np.diff(ts) < 0)
  # logSNR: equal steps in lambda.
  lam = sde.log_snr(fast_samplers.time_grid(sde, 8, "logSNR", eps=1e-5))
  np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-4)
