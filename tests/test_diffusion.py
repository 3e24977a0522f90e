"""Parity of magicvideo_jax.diffusion with diffusers' DDIM / DPM-Solver++ schedulers, plus properties."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from magicvideo_jax import config as common
from magicvideo_jax import diffusion
from magicvideo_jax import losses

# diffusers 0.42 calls np.array(copy=False) on torch tensors; harmless.
pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')

SD = dict(num_train_timesteps=1000, beta_schedule='scaled_linear', beta_start=0.00085,
          beta_end=0.012, set_alpha_to_one=False, steps_offset=1, timestep_spacing='leading')
SHAPE = (2, 8, 8, 4)


def _schedules(prediction_type='epsilon', **overrides):
  """(ours, diffusers DDIM, diffusers DPM-Solver++) built from the same config."""
  cfg = dict(SD, prediction_type=prediction_type, **overrides)
  ddim = diffusers.DDIMScheduler(clip_sample=False, **cfg)
  dpm_cfg = {k: v for k, v in cfg.items() if k != 'set_alpha_to_one'}
  dpm = diffusers.DPMSolverMultistepScheduler(**dpm_cfg)
  return diffusion.Schedule.from_config(cfg), ddim, dpm


def _model_np(abar, prediction_type):
  """A fixed smooth "denoiser" (x, t) -> output, near the optimum for unit-variance data."""
  def model(x, t):
    slope = np.sqrt(1 - abar[t]) if prediction_type == 'epsilon' else 0.1
    return (slope * x + 0.2 * np.tanh(x) * np.cos(t / 300.0)).astype(np.float32)
  return model


def _model_jnp(abar, prediction_type):
  abar = jnp.asarray(abar)
  def model(x, t):
    slope = jnp.sqrt(1 - abar[t]) if prediction_type == 'epsilon' else 0.1
    return slope * x + 0.2 * jnp.tanh(x) * jnp.cos(t / 300.0)
  return model


def _diffusers_trajectory(scheduler, model, x, n, eta=0.0, noises=None):
  scheduler.set_timesteps(n)
  x, traj = torch.from_numpy(x), []
  for i, t in enumerate(scheduler.timesteps):
    out = torch.from_numpy(model(x.numpy(), int(t)))
    kwargs = {}
    if eta > 0:
      kwargs = dict(eta=eta, variance_noise=torch.from_numpy(noises[i]))
    x = scheduler.step(out, t, x, **kwargs).prev_sample
    traj.append(x.numpy())
  return scheduler.timesteps.numpy(), np.stack(traj)


# ---------------------------------------------------------------------------------------------
# Schedules and timesteps.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('beta_schedule,beta_start,beta_end', [
    ('scaled_linear', 0.00085, 0.012), ('linear', 0.0001, 0.02), ('squaredcos_cap_v2', 0., 0.)])
def test_betas_and_alphas_cumprod_match_diffusers(beta_schedule, beta_start, beta_end):
  ref = diffusers.DDIMScheduler(beta_schedule=beta_schedule, beta_start=beta_start,
                                beta_end=beta_end, set_alpha_to_one=False)
  ours = diffusion.Schedule.from_config(dict(
      num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=beta_start,
      beta_end=beta_end, prediction_type='epsilon', timestep_spacing='leading', steps_offset=0,
      set_alpha_to_one=False))
  for name in ('betas', 'alphas_cumprod'):
    a, b = np.asarray(getattr(ours, name)), getattr(ref, name).numpy()
    rel = np.max(np.abs(a / b - 1))
    print(f'{beta_schedule} {name}: max rel err {rel:.2e}')
    assert a.dtype == np.float32 and rel < 1e-6
  assert float(ours.final_alpha_cumprod) == float(ref.final_alpha_cumprod)


def test_zero_terminal_snr_matches_diffusers():
  cfg = dict(SD, prediction_type='v_prediction', rescale_betas_zero_snr=True)
  ref = diffusers.DDIMScheduler(**cfg)
  ours = diffusion.Schedule.from_config(cfg)
  plain = diffusion.Schedule.from_config(dict(cfg, rescale_betas_zero_snr=False))
  abar, ref_abar = np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy()
  # What noising uses is sqrt(abar); relative errors of abar itself mean little in the ~1e-7 tail.
  err = np.abs(np.sqrt(abar) - np.sqrt(ref_abar)).max()
  large = ref_abar > 1e-3
  rel = np.max(np.abs(abar[large] / ref_abar[large] - 1))
  print(f'zero terminal SNR: sqrt(alphas_cumprod) max abs err {err:.2e}, alphas_cumprod max rel err '
        f'{rel:.2e} where > 1e-3; last {abar[-1]} (diffusers {ref_abar[-1]}); first {abar[0]:.6f} '
        f'(unrescaled {float(plain.alphas_cumprod[0]):.6f})')
  assert err < 1e-6 and rel < 1e-5 and abar[-1] == 0.0 == ref_abar[-1]
  np.testing.assert_allclose(abar[0], plain.alphas_cumprod[0], rtol=1e-6)
  assert np.all(np.diff(abar) < 0)
  with pytest.raises(ValueError, match='v_prediction'):
    diffusion.Schedule.from_config(dict(cfg, prediction_type='epsilon'))
  from_json = diffusion.Schedule.from_diffusers_config(dict(ref.config))
  np.testing.assert_array_equal(from_json.alphas_cumprod, ours.alphas_cumprod)


def test_schedule_from_configs():
  ours = diffusion.Schedule.from_config(common.diffusion_sd15())
  assert (ours.prediction_type, ours.timestep_spacing, ours.steps_offset) == ('epsilon', 'leading', 1)
  np.testing.assert_allclose(ours.final_alpha_cumprod, ours.alphas_cumprod[0])
  # A SD 1.5 scheduler_config.json (PNDM) with keys we do not use.
  sd15_json = dict(_class_name='PNDMScheduler', beta_end=0.012, beta_schedule='scaled_linear',
                   beta_start=0.00085, num_train_timesteps=1000, set_alpha_to_one=False,
                   skip_prk_steps=True, steps_offset=1, trained_betas=None, clip_sample=False)
  from_json = diffusion.Schedule.from_diffusers_config(sd15_json)
  np.testing.assert_array_equal(from_json.alphas_cumprod, ours.alphas_cumprod)
  assert from_json.steps_offset == 1 and from_json.timestep_spacing == 'leading'
  betas = np.linspace(1e-3, 2e-2, 50)
  trained = diffusion.Schedule.from_diffusers_config(dict(trained_betas=betas.tolist(),
                                                          prediction_type='v_prediction'))
  np.testing.assert_allclose(trained.betas, betas.astype(np.float32))
  assert trained.num_train_timesteps == 50 and float(trained.final_alpha_cumprod) == 1.0
  with pytest.raises(ValueError, match='diffusion_sd15'):
    diffusion.Schedule.from_config(dict(beta_schedule='linear'))
  with pytest.raises(ValueError, match='timestep_spacing'):
    diffusion.Schedule.from_config(dict(SD, prediction_type='epsilon', timestep_spacing='even'))


@pytest.mark.parametrize('spacing', diffusion.TIMESTEP_SPACINGS)
def test_inference_timesteps_match_diffusers(spacing):
  checked = 0
  for steps_offset in (0, 1):
    for n in (1, 3, 7, 10, 20, 25, 50, 999, 1000):
      cfg = dict(timestep_spacing=spacing, steps_offset=steps_offset)
      ddim = diffusers.DDIMScheduler(**cfg)
      dpm = diffusers.DPMSolverMultistepScheduler(**cfg)
      for sampler, ref in (('ddim', ddim), ('dpmsolver++', dpm)):
        if sampler == 'dpmsolver++' and n == 1000 and spacing == 'leading':
          continue  # diffusers' own DPM leading rule gives step_ratio 0 here.
        ref.set_timesteps(n)
        ours = diffusion.inference_timesteps(n, 1000, spacing, steps_offset, sampler)
        np.testing.assert_array_equal(ours, ref.timesteps.numpy(), err_msg=f'{sampler} n={n}')
        checked += 1
  # The two samplers really do differ for 'leading' (DPM spaces n + 1 points).
  assert spacing == 'trailing' or not np.array_equal(
      diffusion.inference_timesteps(10, 1000, spacing, 1, 'ddim'),
      diffusion.inference_timesteps(10, 1000, spacing, 1, 'dpmsolver++'))
  print(f'{spacing}: {checked} timestep arrays identical')


# ---------------------------------------------------------------------------------------------
# Training maths.
# ---------------------------------------------------------------------------------------------


def test_sample_timesteps():
  keys = jax.random.split(jax.random.key(0), 20000)
  uniform = np.asarray(diffusion.sample_timesteps(keys, 1000))
  # The default draws exactly what training always drew (one randint per example key).
  np.testing.assert_array_equal(
      uniform, jax.vmap(lambda k: jax.random.randint(k, (), 0, 1000))(keys))
  shifted = np.asarray(diffusion.sample_timesteps(keys, 1000, 'logit_normal', 0.8, 1.0))
  assert shifted.dtype == np.int32 and shifted.min() >= 0 and shifted.max() <= 999
  expected_median = 1000 / (1 + np.exp(-0.8))
  print(f'logit-normal(0.8, 1): median t {np.median(shifted):.0f} (expected {expected_median:.0f}); '
        f'share of t >= 800: {np.mean(shifted >= 800):.3f} vs uniform {np.mean(uniform >= 800):.3f}')
  assert abs(np.median(shifted) - expected_median) < 10
  assert np.mean(shifted >= 800) > 1.3 * np.mean(uniform >= 800)
  with pytest.raises(ValueError, match='timestep sampling'):
    diffusion.sample_timesteps(keys, 1000, 'beta')


def test_frame_noise_correlation():
  import ml_collections  # pylint: disable=g-import-not-at-top
  shape = (4, 6, 6, 2)  # [F, h, w, c]
  keys = jax.random.split(jax.random.key(0), 3000)
  config = ml_collections.ConfigDict(dict(diffusion=dict(frame_noise_correlation=0.0)))
  # Off: exactly the i.i.d. draws training always made.
  np.testing.assert_array_equal(losses.frame_noise(keys, shape, config),
                                losses.example_normal(keys, shape))
  config.diffusion.frame_noise_correlation = 0.6
  frame_mask = np.ones((3000, 4), bool)
  frame_mask[:, 3] = False  # The last frame is an appended still image.
  noise = np.asarray(losses.frame_noise(keys, shape, config, jnp.asarray(frame_mask)))
  flat = noise.reshape(3000, 4, -1)
  corr = lambda i, j: np.mean([np.corrcoef(flat[:, i, k], flat[:, j, k])[0, 1] for k in range(72)])
  print(f'frame noise: var {noise.var():.3f}; corr(frame 0, 1) {corr(0, 1):.3f} (rho 0.6), '
        f'corr(frame 0, image) {corr(0, 3):.3f}')
  assert abs(noise.var() - 1) < 0.02
  assert abs(corr(0, 1) - 0.6) < 0.03 and abs(corr(1, 2) - 0.6) < 0.03 and abs(corr(0, 3)) < 0.03
  start = np.asarray(diffusion.initial_noise(jax.random.key(1), (3000, 4) + shape[1:], 0.6))
  assert abs(np.corrcoef(start[:, 0].ravel(), start[:, 2].ravel())[0, 1] - 0.6) < 0.03
  np.testing.assert_array_equal(diffusion.initial_noise(jax.random.key(1), (2, 4, 3, 3, 2)),
                                jax.random.normal(jax.random.key(1), (2, 4, 3, 3, 2)))
  with pytest.raises(ValueError, match='frame_noise_correlation'):
    diffusion.mix_frame_noise(jnp.zeros((1, 2, 1)), jnp.zeros((1, 1, 1)), 1.0)


@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction'])
def test_add_noise_and_targets_match_diffusers(prediction_type):
  ours, ref, _ = _schedules(prediction_type)
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((3, 2, 4, 4, 4)).astype(np.float32)  # [B, F, H, W, C]
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  t = np.array([0, 500, 999])
  noisy = diffusion.add_noise(ours, x0, noise, t)
  ref_noisy = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
  err = np.abs(np.asarray(noisy) - ref_noisy.numpy()).max()
  target = diffusion.training_target(ours, x0, noise, t)
  ref_target = (noise if prediction_type == 'epsilon' else ref.get_velocity(
      torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy())
  terr = np.abs(np.asarray(target) - ref_target).max()
  x0_hat, eps_hat = diffusion.predict_x0_eps(ours, noisy, target, t)
  rerr = max(np.abs(np.asarray(x0_hat) - x0).max(), np.abs(np.asarray(eps_hat) - noise).max())
  print(f'{prediction_type}: add_noise {err:.2e}, target {terr:.2e}, x0/eps round trip {rerr:.2e}')
  assert err < 1e-6 and terr < 1e-6 and rerr < 1e-4  # Round trip divides by sqrt(abar_999).
  # bf16 latents: float32 arithmetic and result.
  assert diffusion.add_noise(ours, x0.astype(jnp.bfloat16), noise, t).dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Samplers: full trajectories against diffusers.
# ---------------------------------------------------------------------------------------------

ZERO_SNR = dict(rescale_betas_zero_snr=True, timestep_spacing='trailing', steps_offset=0)
DDIM_CASES = [
    # prediction_type, n, eta, schedule overrides
    ('epsilon', 10, 0.0, {}),
    ('epsilon', 25, 0.0, {}),
    ('epsilon', 25, 0.5, {}),
    ('v_prediction', 10, 0.0, {}),
    ('v_prediction', 25, 0.5, {}),
    ('v_prediction', 25, 0.0, dict(beta_schedule='squaredcos_cap_v2', timestep_spacing='trailing',
                                   set_alpha_to_one=True, steps_offset=0)),
    ('epsilon', 25, 0.0, dict(beta_schedule='linear', beta_start=1e-4, beta_end=0.02,
                              timestep_spacing='linspace', steps_offset=0)),
    ('v_prediction', 25, 0.0, ZERO_SNR),
    ('v_prediction', 10, 0.5, ZERO_SNR),
]


@pytest.mark.parametrize('prediction_type,n,eta,overrides', DDIM_CASES)
def test_ddim_trajectory_matches_diffusers(prediction_type, n, eta, overrides):
  ours, ref, _ = _schedules(prediction_type, **overrides)
  model = _model_np(ref.alphas_cumprod.numpy(), prediction_type)
  rng = np.random.default_rng(n)
  x = rng.standard_normal(SHAPE).astype(np.float32)
  noises = rng.standard_normal((n,) + SHAPE).astype(np.float32)
  timesteps, ref_traj = _diffusers_trajectory(ref, model, x, n, eta, noises)
  np.testing.assert_array_equal(
      timesteps, diffusion.inference_timesteps(n, 1000, ours.timestep_spacing, ours.steps_offset))
  step = jax.jit(diffusion.ddim_step, static_argnums=4, static_argnames='eta')
  traj = []
  for i, t in enumerate(timesteps):
    x, _ = step(ours, model(np.asarray(x), int(t)), t, x, n, eta=eta,
                variance_noise=noises[i] if eta > 0 else None)
    traj.append(np.asarray(x))
  err = np.abs(np.stack(traj) - ref_traj).max()
  print(f'DDIM {prediction_type} n={n} eta={eta} {overrides}: max abs err {err:.2e} '
        f'(|x| <= {np.abs(ref_traj).max():.1f})')
  assert err <= 1e-5


DPM_CASES = [
    # prediction_type, n, final_sigmas_type, sigma_spacing, schedule overrides
    ('epsilon', 10, 'zero', None, {}),
    ('epsilon', 25, 'zero', None, {}),
    ('v_prediction', 10, 'zero', None, {}),
    ('v_prediction', 25, 'zero', None, {}),
    ('epsilon', 20, 'sigma_min', None, {}),  # Last step second order (n >= 15, final sigma > 0).
    ('epsilon', 20, 'zero', None, dict(timestep_spacing='linspace', steps_offset=0)),
    ('v_prediction', 15, 'zero', None, dict(beta_schedule='squaredcos_cap_v2', steps_offset=0,
                                            timestep_spacing='trailing')),
    ('epsilon', 20, 'zero', 'karras', {}),
    ('v_prediction', 25, 'sigma_min', 'karras', {}),
    ('epsilon', 15, 'zero', 'lu_lambdas', {}),
    ('v_prediction', 25, 'zero', 'lu_lambdas', {}),
    ('v_prediction', 20, 'zero', None, ZERO_SNR),
    ('v_prediction', 15, 'zero', 'lu_lambdas', ZERO_SNR),
]


@pytest.mark.parametrize('prediction_type,n,final_sigmas_type,sigma_spacing,overrides', DPM_CASES)
def test_dpm_solver_trajectory_matches_diffusers(prediction_type, n, final_sigmas_type,
                                                 sigma_spacing, overrides):
  ours, _, ref = _schedules(prediction_type, **overrides)
  ref.register_to_config(final_sigmas_type=final_sigmas_type,
                         use_karras_sigmas=sigma_spacing == 'karras',
                         use_lu_lambdas=sigma_spacing == 'lu_lambdas')
  model = _model_np(ref.alphas_cumprod.numpy(), prediction_type)
  x = np.random.default_rng(n).standard_normal(SHAPE).astype(np.float32)
  ref_timesteps, ref_traj = _diffusers_trajectory(ref, model, x, n)
  timesteps, sigmas = diffusion.dpm_solver_timesteps(
      ours, n, sigma_spacing=sigma_spacing, final_sigmas_type=final_sigmas_type)
  np.testing.assert_array_equal(timesteps, ref_timesteps)
  np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=2e-6)
  plan = diffusion.dpm_solver_plan(sigmas, final_sigmas_type)
  step = jax.jit(diffusion.dpm_solver_step)
  prev_x0, traj = np.zeros_like(x), []
  for i, t in enumerate(np.asarray(timesteps)):
    x, prev_x0 = step(ours, model(np.asarray(x), int(t)), x, prev_x0, *(p[i] for p in plan))
    traj.append(np.asarray(x))
  err = np.abs(np.stack(traj) - ref_traj).max()
  print(f'DPM++2M {prediction_type} n={n} final={final_sigmas_type} sigmas={sigma_spacing} '
        f'{overrides}: max abs err {err:.2e} (|x| <= {np.abs(ref_traj).max():.1f})')
  assert np.all(np.isfinite(traj)) and err <= 1e-5


# ---------------------------------------------------------------------------------------------
# The scanned loop.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('sampler,prediction_type,eta,sigma_spacing', [
    ('ddim', 'epsilon', 0.0, None), ('ddim', 'v_prediction', 0.5, None),
    ('dpmsolver++', 'epsilon', 0.0, None), ('dpmsolver++', 'v_prediction', 0.0, 'karras')])
def test_sample_loop_matches_diffusers_and_compiles_once(sampler, prediction_type, eta,
                                                         sigma_spacing):
  n = 12
  ours, ddim, dpm = _schedules(prediction_type)
  dpm.register_to_config(use_karras_sigmas=sigma_spacing == 'karras')
  ref = ddim if sampler == 'ddim' else dpm
  abar = ref.alphas_cumprod.numpy()
  model = _model_jnp(abar, prediction_type)
  traces = []

  @jax.jit
  def generate(latents, key):
    traces.append(1)  # Python side effect: runs once per trace.
    return diffusion.sample_loop(model, latents, ours, n, sampler=sampler, eta=eta, key=key,
                                 sigma_spacing=sigma_spacing)

  rng = np.random.default_rng(1)
  for seed in (0, 1):
    x = rng.standard_normal(SHAPE).astype(np.float32)
    key = jax.random.key(seed)
    noises = None
    if eta > 0:  # The noise sample_loop draws, fed to diffusers as variance_noise.
      noises = [np.array(jax.random.normal(k, SHAPE)) for k in jax.random.split(key, n)]
    _, ref_traj = _diffusers_trajectory(ref, _model_np(abar, prediction_type), x, n, eta, noises)
    out = generate(jnp.asarray(x), key)
    err = np.abs(np.asarray(out) - ref_traj[-1]).max()
    print(f'sample_loop {sampler} {prediction_type} eta={eta} sigmas={sigma_spacing} seed={seed}: '
          f'max abs err {err:.2e}')
    assert out.dtype == jnp.float32 and err <= 1e-5
  assert len(traces) == 1 and generate._cache_size() == 1


def test_sample_loop_errors():
  ours = diffusion.Schedule.from_config(common.diffusion_sd15())
  x = jnp.zeros(SHAPE)
  with pytest.raises(ValueError, match="'ddim', 'dpmsolver\\+\\+'"):
    diffusion.sample_loop(lambda x, t: x, x, ours, 10, sampler='euler')
  with pytest.raises(ValueError, match='key'):
    diffusion.sample_loop(lambda x, t: x, x, ours, 10, eta=1.0)
  with pytest.raises(ValueError, match='DPM-Solver option'):
    diffusion.sample_loop(lambda x, t: x, x, ours, 10, sigma_spacing='karras')
  with pytest.raises(ValueError, match='DDIM option'):
    diffusion.sample_loop(lambda x, t: x, x, ours, 10, sampler='dpmsolver++', eta=1.0,
                          key=jax.random.key(0))


@pytest.mark.parametrize('sampler,sigma_spacing,start_step', [
    ('ddim', None, 4), ('dpmsolver++', None, 3), ('dpmsolver++', 'lu_lambdas', 5)])
def test_image_to_image_start_matches_diffusers(sampler, sigma_spacing, start_step):
  """diffusers' img2img: noise x0 to timesteps[k] (add_noise; DPM-Solver at sigmas[k]) and run the
  steps from k on, DPM-Solver restarting at first order (set_begin_index)."""
  n = 12
  ours, ddim, dpm = _schedules()
  if sigma_spacing == 'lu_lambdas':
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(dpm.config, use_lu_lambdas=True)
  scheduler = ddim if sampler == 'ddim' else dpm
  rng = np.random.default_rng(0)
  x0, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
  model = _model_np(ours.alphas_cumprod, 'epsilon')

  scheduler.set_timesteps(n)
  timesteps = scheduler.timesteps
  if sampler == 'dpmsolver++':
    scheduler.set_begin_index(start_step)
  x = scheduler.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps[start_step:][:1])
  start = x.numpy()
  for t in timesteps[start_step:]:
    x = scheduler.step(torch.from_numpy(model(x.numpy(), int(t))), t, x).prev_sample
  expected = x.numpy()

  options = dict(sampler=sampler, sigma_spacing=sigma_spacing)
  noisy = diffusion.noise_to_step(ours, jnp.asarray(x0), jnp.asarray(noise), n, start_step, **options)
  np.testing.assert_allclose(noisy, start, rtol=1e-5, atol=1e-5)
  out = diffusion.sample_loop(_model_jnp(ours.alphas_cumprod, 'epsilon'), noisy, ours, n,
                              start_step=start_step, **options)
  err = float(np.max(np.abs(np.asarray(out) - expected)) / np.max(np.abs(expected)))
  print(f'img2img {sampler} {sigma_spacing} from step {start_step}/{n}: max rel err {err:.2e}')
  assert err < 1e-4


@pytest.mark.parametrize('sampler', diffusion.SAMPLERS)
def test_image_to_image_with_the_exact_noise_returns_the_data(sampler):
  """A model that predicts the very noise that `noise_to_step` added reads x0 back exactly at every
  step, so the run ends on x0; noising to any other level than the start step's breaks that.
  (set_alpha_to_one: DDIM's last step then lands on x0 itself, not on the level of t = 0.)"""
  ours, _, _ = _schedules(set_alpha_to_one=True)
  x0, noise = jax.random.normal(jax.random.key(0), (2,) + SHAPE)
  for start_step in (0, 3, 9):
    noisy = diffusion.noise_to_step(ours, x0, noise, 10, start_step, sampler=sampler)
    out = diffusion.sample_loop(lambda x, t: noise, noisy, ours, 10, sampler=sampler,
                                start_step=start_step)
    np.testing.assert_allclose(out, x0, rtol=1e-4, atol=1e-4)
  off_by_one = diffusion.noise_to_step(ours, x0, noise, 10, 4, sampler=sampler)
  out = diffusion.sample_loop(lambda x, t: noise, off_by_one, ours, 10, sampler=sampler,
                              start_step=3)
  assert float(jnp.max(jnp.abs(out - x0))) > 1e-2


@pytest.mark.parametrize('sampler', diffusion.SAMPLERS)
def test_sample_loop_on_step_sees_every_step(sampler):
  """`on_step(index, x)` runs after each step's update (index from start_step on, x the new
  latents: the last one is the result) and leaves the result as without it."""
  ours, _, _ = _schedules()
  model = _model_jnp(ours.alphas_cumprod, 'epsilon')
  latents = jax.random.normal(jax.random.key(1), SHAPE)
  for start_step in (0, 3):
    seen = []
    hook = lambda i, x: jax.debug.callback(lambda i, x: seen.append((int(i), np.asarray(x))), i, x)
    run = lambda x, on_step: diffusion.sample_loop(model, x, ours, 6, sampler=sampler,
                                                   start_step=start_step, on_step=on_step)
    out = jax.jit(lambda x: run(x, hook))(latents)
    assert [i for i, _ in seen] == list(range(start_step, 6))
    np.testing.assert_array_equal(seen[-1][1], out)
    assert np.abs(seen[0][1] - seen[-1][1]).max() > 1e-3
    np.testing.assert_allclose(out, jax.jit(lambda x: run(x, None))(latents), rtol=1e-6, atol=1e-6)


def test_strength_start_step():
  assert diffusion.strength_start_step(20, 1.0) == 0
  assert diffusion.strength_start_step(20, 0.5) == 10
  assert diffusion.strength_start_step(15, 0.5) == 8  # diffusers truncates: 7 steps run, not 8.
  assert diffusion.strength_start_step(20, 0.01) == 19  # At least one step runs.
  for strength in (0.0, 1.5):
    with pytest.raises(ValueError, match='strength'):
      diffusion.strength_start_step(20, strength)
  with pytest.raises(ValueError, match='start_step'):
    diffusion.sample_loop(lambda x, t: x, jnp.zeros(SHAPE), _schedules()[0], 10, start_step=10)


# ---------------------------------------------------------------------------------------------
# Quality: DPM-Solver++ in fewer steps vs DDIM-50 on a problem with a known exact answer.
# ---------------------------------------------------------------------------------------------


def test_dpm_solver_beats_ddim50_on_gaussian_data():
  """Quality in fewer steps, against the exact probability-flow ODE solution.

  Data x0 ~ N(mu, s^2) per dimension, so the optimal eps-prediction is closed form, and the ODE
  maps x at level abar_a to x = sqrt(abar_b) mu + sqrt(abar_b s^2 + 1 - abar_b) z at level abar_b,
  with z = (x - sqrt(abar_a) mu) / sqrt(abar_a s^2 + 1 - abar_a). Each sampler is compared with
  the exact map from its own first noise level to its own last one. Schedule: SD defaults.
  """
  ours = diffusion.Schedule.from_config(common.diffusion_sd15())
  abar = ours.alphas_cumprod
  mu = jnp.linspace(-1.0, 1.0, 64)
  s = jnp.linspace(0.05, 1.0, 64)  # Small s: sharply peaked data, the hard end of the ODE.

  def optimal_eps(x, t):
    return jnp.sqrt(1 - abar[t]) * (x - jnp.sqrt(abar[t]) * mu) / (abar[t] * s**2 + 1 - abar[t])

  x_init = jax.random.normal(jax.random.key(0), (256, 64))

  def rms_error(sampler, n, **kwargs):
    out = jax.jit(lambda x: diffusion.sample_loop(optimal_eps, x, ours, n, sampler=sampler,
                                                  **kwargs))(x_init)
    if sampler == 'ddim':
      first = abar[diffusion.inference_timesteps(n, 1000, 'leading', 1)[0]]
      last = ours.final_alpha_cumprod
    else:
      _, sigmas = diffusion.dpm_solver_timesteps(ours, n, **kwargs)
      first, last = 1 / (1 + sigmas[0]**2), 1 / (1 + sigmas[-1]**2)
    z = (x_init - jnp.sqrt(first) * mu) / jnp.sqrt(first * s**2 + 1 - first)
    exact = jnp.sqrt(last) * mu + jnp.sqrt(last * s**2 + 1 - last) * z
    return float(jnp.sqrt(jnp.mean((out - exact)**2)))

  errs = {}
  for name, n, kwargs in (
      ('ddim', 50, {}), ('ddim', 1000, dict(steps_offset=0)),
      ('dpmsolver++', 20, {}),  # diffusers' defaults: uniform in t, last step a jump to sigma = 0.
      ('dpmsolver++', 15, dict(sigma_spacing='karras')),
      ('dpmsolver++', 20, dict(sigma_spacing='karras')),
      ('dpmsolver++', 15, dict(sigma_spacing='lu_lambdas')),
      ('dpmsolver++', 20, dict(sigma_spacing='lu_lambdas'))):
    errs[name, n, kwargs.get('sigma_spacing')] = rms_error(name, n, **kwargs)
  for (name, n, spacing), e in errs.items():
    print(f'{name:12s} {n:5d} steps, sigmas {spacing or "at leading timesteps":21s}: '
          f'RMS error vs exact ODE solution {e:.2e}')
  ddim50 = errs['ddim', 50, None]
  assert errs['ddim', 1000, None] < ddim50 / 5  # The comparison measures ODE-solving error.
  for spacing in ('karras', 'lu_lambdas'):
    assert errs['dpmsolver++', 15, spacing] <= ddim50
    assert errs['dpmsolver++', 20, spacing] <= ddim50


@pytest.mark.parametrize('sampler,sigma_spacing', [('ddim', None), ('dpmsolver++', 'karras')])
def test_sample_loop_takes_a_traced_schedule_and_has_no_cond(sampler, sigma_spacing):
  ours = diffusion.Schedule.from_config(common.diffusion_sd15())
  model = lambda x, t: 0.1 * x * jnp.cos(t / 300.0)

  def generate(schedule, latents):
    return diffusion.sample_loop(model, latents, schedule, 8, sampler=sampler,
                                 sigma_spacing=sigma_spacing)

  x = jnp.ones(SHAPE)
  jaxpr = str(jax.make_jaxpr(generate)(ours, x))
  assert 'scan' in jaxpr and 'cond' not in jaxpr
  np.testing.assert_allclose(jax.jit(generate)(ours, x), generate(ours, x), rtol=1e-6, atol=1e-6)
