"""Diffusion maths: noise schedules, training targets, and the DDIM and DPM-Solver++ samplers.

Each function matches diffusers' `DDIMScheduler` / `DPMSolverMultistepScheduler` (0.42) step for step,
but as a pure function of a `Schedule`, so that the whole sampling loop is one `lax.scan` inside the
caller's `jax.jit`. Scheduler arithmetic is float32 whatever the dtype of the latents or the model.

Notation: `abar = alphas_cumprod[t]`; a noisy latent is x_t = sqrt(abar) x0 + sqrt(1 - abar) eps.
DPM-Solver indexes noise levels by diffusers' `sigma = sqrt((1 - abar) / abar)` and works with
alpha_t = sqrt(abar), sigma_t = sqrt(1 - abar) and the half log-SNR lambda_t = log(alpha_t / sigma_t).
"""

import dataclasses
import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ('scaled_linear', 'linear', 'squaredcos_cap_v2')
PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample')
TIMESTEP_SPACINGS = ('leading', 'trailing', 'linspace')
SAMPLERS = ('ddim', 'dpmsolver++')
TIMESTEP_SAMPLINGS = ('uniform', 'logit_normal')  # Training timesteps.
FINAL_SIGMAS_TYPES = ('zero', 'sigma_min')
SIGMA_SPACINGS = ('karras', 'lu_lambdas')  # DPM-Solver only.
INIT_NOISE_SIGMA = 1.0  # Both samplers start from unit-variance noise.

# diffusers' DDIMScheduler defaults, used for keys absent from a scheduler_config.json.
_DIFFUSERS_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule='linear',
    trained_betas=None, prediction_type='epsilon', timestep_spacing='leading', steps_offset=0,
    set_alpha_to_one=True, rescale_betas_zero_snr=False)
# DPM-Solver's floor on abar at zero terminal SNR (diffusers: the smallest fp16 subnormal), so that
# its first sigma is finite.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def _check(name: str, value: Any, valid: Tuple[str, ...]) -> None:
  if value not in valid:
    raise ValueError(f'Unknown {name} {value!r}; valid values are {valid}.')


def _static(default):
  return dataclasses.field(default=default, metadata=dict(static=True))


# ---------------------------------------------------------------------------------------------
# Noise schedules.
# ---------------------------------------------------------------------------------------------


def make_betas(beta_schedule: str, num_train_timesteps: int, beta_start: float,
               beta_end: float) -> np.ndarray:
  """float32 [T] betas as diffusers builds them (torch.linspace may differ in the last ulp)."""
  _check('beta_schedule', beta_schedule, BETA_SCHEDULES)
  if beta_schedule == 'linear':
    return np.linspace(beta_start, beta_end, num_train_timesteps).astype(np.float32)
  if beta_schedule == 'scaled_linear':  # Latent diffusion: linear in sqrt(beta), squared in fp32.
    return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps).astype(np.float32)**2
  # Cosine schedule of Nichol & Dhariwal (GLIDE), each beta capped at 0.999; float64 like diffusers.
  alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2)**2
  steps = num_train_timesteps
  return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                   for i in range(steps)], np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Betas whose last abar is exactly 0 (Lin et al. 2023, Algorithm 1; diffusers'
  `rescale_betas_zero_snr`): sqrt(abar) is shifted to end at 0 and rescaled to keep its first value.

  Without it the last training step still holds sqrt(abar_T) of the clean latents (0.068 for SD's
  schedule): a model learns to read the layout of each frame from that residue, and pure-noise samples
  then get an independent layout per frame.
  """
  abar_sqrt = np.sqrt(np.cumprod((1 - np.asarray(betas, np.float32)).astype(np.float64)).astype(
      np.float32))
  first, last = abar_sqrt[0], abar_sqrt[-1]
  abar_sqrt = (abar_sqrt - last) * (first / (first - last))
  abar = abar_sqrt**2
  alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
  return (1 - alphas).astype(np.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
  """A discrete noise schedule: float32 arrays plus the static options that go with the model.

  A pytree (arrays are leaves, the rest is static), so it can be a `jax.jit` argument or a constant.
  """
  betas: jax.Array  # [T]
  alphas_cumprod: jax.Array  # [T], abar_t.
  final_alpha_cumprod: jax.Array  # [], the abar DDIM steps to after t = 0 (1 or abar_0).
  prediction_type: str = _static('epsilon')
  timestep_spacing: str = _static('leading')
  steps_offset: int = _static(0)

  @property
  def num_train_timesteps(self) -> int:
    return self.betas.shape[0]

  @classmethod
  def from_betas(cls, betas, *, set_alpha_to_one: bool = False, prediction_type: str = 'epsilon',
                 timestep_spacing: str = 'leading', steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False) -> 'Schedule':
    _check('prediction_type', prediction_type, PREDICTION_TYPES)
    _check('timestep_spacing', timestep_spacing, TIMESTEP_SPACINGS)
    betas = np.asarray(betas, np.float32)
    if rescale_betas_zero_snr:
      if prediction_type == 'epsilon':
        raise ValueError('rescale_betas_zero_snr=True needs prediction_type="v_prediction" (or '
                         '"sample"): at zero SNR an epsilon prediction says nothing about x0.')
      betas = rescale_zero_terminal_snr(betas)
    # torch's CPU cumprod accumulates float32 in float64: do the same to match it bit for bit.
    alphas_cumprod = np.cumprod((1 - betas).astype(np.float64)).astype(np.float32)
    final = np.float32(1.0) if set_alpha_to_one else alphas_cumprod[0]
    return cls(jnp.asarray(betas), jnp.asarray(alphas_cumprod), jnp.asarray(final),
               prediction_type, timestep_spacing, int(steps_offset))

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> 'Schedule':
    """From a dict / ConfigDict with the keys of `magicvideo_jax.config.diffusion_sd15()`."""
    config = dict(config.to_dict() if hasattr(config, 'to_dict') else config)
    required = ('num_train_timesteps', 'beta_schedule', 'beta_start', 'beta_end',
                'prediction_type', 'timestep_spacing', 'steps_offset', 'set_alpha_to_one')
    missing = [k for k in required if k not in config]
    if missing:
      raise ValueError(f'Diffusion config lacks {missing}; see magicvideo_jax/config.py:diffusion_sd15().')
    if config.get('trained_betas') is not None:
      betas = config['trained_betas']
    else:
      betas = make_betas(config['beta_schedule'], config['num_train_timesteps'],
                         config['beta_start'], config['beta_end'])
    return cls.from_betas(
        betas, set_alpha_to_one=config['set_alpha_to_one'],
        prediction_type=config['prediction_type'], timestep_spacing=config['timestep_spacing'],
        steps_offset=config['steps_offset'],
        rescale_betas_zero_snr=bool(config.get('rescale_betas_zero_snr', False)))

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any]) -> 'Schedule':
    """From a diffusers scheduler_config.json dict; unknown keys are ignored."""
    return cls.from_config({k: config.get(k, v) for k, v in _DIFFUSERS_DEFAULTS.items()})


# ---------------------------------------------------------------------------------------------
# Training maths. Timesteps are int [] or [B]; arrays are [B, ...]; results are float32.
# ---------------------------------------------------------------------------------------------


def _at(values: jax.Array, timesteps: jax.Array, ndim: int) -> jax.Array:
  """values[timesteps] with trailing singleton axes to broadcast against an ndim-D array."""
  timesteps = jnp.asarray(timesteps)
  return values[timesteps].reshape(timesteps.shape + (1,) * (ndim - timesteps.ndim))


def add_noise(schedule: Schedule, x0: jax.Array, noise: jax.Array,
              timesteps: jax.Array) -> jax.Array:
  """The forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, [B, ...] float32."""
  abar = _at(schedule.alphas_cumprod, timesteps, x0.ndim)
  return (jnp.sqrt(abar) * x0.astype(jnp.float32)
          + jnp.sqrt(1 - abar) * noise.astype(jnp.float32))


def mix_frame_noise(noise: jax.Array, shared: jax.Array, correlation: float,
                    frame_mask: Optional[jax.Array] = None) -> jax.Array:
  """The mixed noise prior of PYoCo (Ge et al. 2023): sqrt(rho) shared + sqrt(1 - rho) noise.

  `noise` `[B, F, ...]` is i.i.d. per frame, `shared` `[B, 1, ...]` one draw per clip: every frame stays
  N(0, I) (what the image model was trained on) while any two frames of a clip correlate by rho =
  `correlation`. Frames with `frame_mask` `[B, F]` False (appended still images) keep their own noise.
  """
  if not 0.0 <= correlation < 1.0:
    raise ValueError(f'frame_noise_correlation={correlation} must be in [0, 1).')
  mixed = math.sqrt(correlation) * shared + math.sqrt(1.0 - correlation) * noise
  if frame_mask is None:
    return mixed
  keep = frame_mask.astype(bool).reshape(frame_mask.shape + (1,) * (noise.ndim - 2))
  return jnp.where(keep, mixed, noise)


def initial_noise(key: jax.Array, shape, frame_correlation: float = 0.0) -> jax.Array:
  """Unit noise `[B, F, ...]` to start sampling from, under the model's frame correlation."""
  noise = jax.random.normal(key, tuple(shape), jnp.float32)
  if not frame_correlation:
    return noise
  shared = jax.random.normal(jax.random.fold_in(key, 1), (shape[0], 1) + tuple(shape[2:]),
                             jnp.float32)
  return mix_frame_noise(noise, shared, frame_correlation)


def training_target(schedule: Schedule, x0: jax.Array, noise: jax.Array, timesteps: jax.Array,
                    prediction_type: Optional[str] = None) -> jax.Array:
  """What the denoiser regresses: eps, v = sqrt(abar) eps - sqrt(1 - abar) x0, or x0 itself."""
  prediction_type = prediction_type or schedule.prediction_type
  _check('prediction_type', prediction_type, PREDICTION_TYPES)
  x0, noise = x0.astype(jnp.float32), noise.astype(jnp.float32)
  if prediction_type == 'epsilon':
    return noise
  if prediction_type == 'sample':
    return x0
  abar = _at(schedule.alphas_cumprod, timesteps, x0.ndim)
  return jnp.sqrt(abar) * noise - jnp.sqrt(1 - abar) * x0


def sample_timesteps(keys: jax.Array, num_train_timesteps: int, sampling: str = 'uniform',
                     logit_mean: float = 0.0, logit_std: float = 1.0) -> jax.Array:
  """int32 `[B]` training timesteps, row i drawn from keys[i].

  'uniform': uniform over [0, T). 'logit_normal' (Esser et al. 2024): t / T = sigmoid(N(logit_mean,
  logit_std)); logit_mean > 0 spends more steps at high noise, where a video model decides where the
  object is in every frame (the layout and the motion).
  """
  _check('timestep sampling', sampling, TIMESTEP_SAMPLINGS)
  if sampling == 'uniform':
    return jax.vmap(lambda k: jax.random.randint(k, (), 0, num_train_timesteps))(keys)
  logits = logit_mean + logit_std * jax.vmap(lambda k: jax.random.normal(k, ()))(keys)
  t = jnp.floor(jax.nn.sigmoid(logits) * num_train_timesteps)
  return jnp.clip(t, 0, num_train_timesteps - 1).astype(jnp.int32)


def snr(schedule: Schedule, timesteps: jax.Array) -> jax.Array:
  """Signal-to-noise ratio abar / (1 - abar) at `timesteps` (for loss weighting)."""
  abar = schedule.alphas_cumprod[timesteps]
  return abar / (1 - abar)


def _x0_eps(model_output, sample, alpha, sigma, prediction_type):
  """(x0, eps) implied by a model output at a level with x_t = alpha x0 + sigma eps."""
  _check('prediction_type', prediction_type, PREDICTION_TYPES)
  if prediction_type == 'epsilon':
    return (sample - sigma * model_output) / alpha, model_output
  if prediction_type == 'v_prediction':
    return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample
  return model_output, (sample - alpha * model_output) / sigma


def predict_x0_eps(schedule: Schedule, sample: jax.Array, model_output: jax.Array,
                   timesteps: jax.Array,
                   prediction_type: Optional[str] = None) -> Tuple[jax.Array, jax.Array]:
  """The clean sample and the noise implied by `model_output` at x_t = `sample`, float32."""
  abar = _at(schedule.alphas_cumprod, timesteps, sample.ndim)
  return _x0_eps(model_output.astype(jnp.float32), sample.astype(jnp.float32), jnp.sqrt(abar),
                 jnp.sqrt(1 - abar), prediction_type or schedule.prediction_type)


# ---------------------------------------------------------------------------------------------
# Inference timesteps.
# ---------------------------------------------------------------------------------------------


def inference_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000,
                        timestep_spacing: str = 'leading', steps_offset: int = 0,
                        sampler: str = 'ddim') -> np.ndarray:
  """int32 [n] decreasing timesteps, as `set_timesteps` of diffusers' scheduler for `sampler`.

  DPM-Solver places n + 1 points and drops the last (t = 0) for 'leading' and 'linspace', so its
  timesteps differ from DDIM's for the same spacing. 'trailing' is the same for both.
  """
  _check('timestep_spacing', timestep_spacing, TIMESTEP_SPACINGS)
  _check('sampler', sampler, SAMPLERS)
  n, total = num_inference_steps, num_train_timesteps
  if not 0 < n <= total:
    raise ValueError(f'num_inference_steps={n} must be in [1, num_train_timesteps={total}].')
  points = n + 1 if sampler == 'dpmsolver++' else n
  if timestep_spacing == 'linspace':
    timesteps = np.linspace(0, total - 1, points).round()[::-1]
  elif timestep_spacing == 'leading':
    timesteps = (np.arange(points) * (total // points)).round()[::-1] + steps_offset
  else:  # trailing
    timesteps = np.round(np.arange(total, 0, -total / n)) - 1
  if sampler == 'dpmsolver++' and timestep_spacing != 'trailing':
    timesteps = timesteps[:-1]
  return timesteps.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Samplers: pure float32 step functions, then the scanned loop.
# ---------------------------------------------------------------------------------------------


def ddim_step(schedule: Schedule, model_output: jax.Array, timestep: jax.Array,
              sample: jax.Array, num_inference_steps: int, *, eta: float = 0.0,
              variance_noise: Optional[jax.Array] = None, clip_sample: bool = False,
              clip_sample_range: float = 1.0) -> Tuple[jax.Array, jax.Array]:
  """One DDIM update x_t -> x_{t - T // n} (DDIMScheduler.step). Returns (prev_sample, x0).

  With eta > 0, `variance_noise` (standard normal, shaped like `sample`) is the fresh noise,
  diffusers' `variance_noise`; None adds none.
  """
  sample, model_output = sample.astype(jnp.float32), model_output.astype(jnp.float32)
  prev_timestep = timestep - schedule.num_train_timesteps // num_inference_steps
  abar = schedule.alphas_cumprod[timestep]
  abar_prev = jnp.where(prev_timestep >= 0,
                        schedule.alphas_cumprod[jnp.maximum(prev_timestep, 0)],
                        schedule.final_alpha_cumprod)
  x0, eps = _x0_eps(model_output, sample, jnp.sqrt(abar), jnp.sqrt(1 - abar),
                    schedule.prediction_type)
  if clip_sample:
    x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
  variance = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
  std = eta * jnp.sqrt(variance)
  prev_sample = jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1 - abar_prev - std**2) * eps
  if variance_noise is not None:
    prev_sample = prev_sample + std * variance_noise.astype(jnp.float32)
  return prev_sample, x0


def dpm_solver_timesteps(schedule: Schedule, num_inference_steps: int, *,
                         timestep_spacing: Optional[str] = None, steps_offset: Optional[int] = None,
                         sigma_spacing: Optional[str] = None,
                         final_sigmas_type: str = 'zero') -> Tuple[jax.Array, jax.Array]:
  """(timesteps [n] int32, sigmas [n + 1] float32) of DPMSolverMultistepScheduler.set_timesteps.

  By default the n timesteps follow `timestep_spacing` and sigma_i is the level of timestep i.
  `sigma_spacing` 'karras' (use_karras_sigmas; Karras et al. rho = 7) or 'lu_lambdas'
  (use_lu_lambdas; uniform in log-SNR, Lu et al.) instead spaces the noise levels between those
  of t = T - 1 and t = 0 and gives the model the nearest (interpolated, rounded) timestep; diffusers
  truncates instead for squaredcos_cap_v2, not reproduced here. The final sigma is 0 ('zero') or
  that of t = 0 ('sigma_min').
  """
  _check('final_sigmas_type', final_sigmas_type, FINAL_SIGMAS_TYPES)
  abar = schedule.alphas_cumprod
  abar = jnp.where(abar > 0, abar, ZERO_SNR_ALPHA_CUMPROD)  # Zero terminal SNR: as diffusers.
  all_sigmas = jnp.sqrt((1 - abar) / abar)  # Increasing in t.
  last = jnp.zeros((1,)) if final_sigmas_type == 'zero' else all_sigmas[:1]
  if sigma_spacing is None:
    timesteps = jnp.asarray(inference_timesteps(
        num_inference_steps, schedule.num_train_timesteps,
        timestep_spacing or schedule.timestep_spacing,
        schedule.steps_offset if steps_offset is None else steps_offset, 'dpmsolver++'))
    return timesteps, jnp.concatenate([all_sigmas[timesteps], last])
  _check('sigma_spacing', sigma_spacing, SIGMA_SPACINGS)
  ramp = jnp.linspace(0.0, 1.0, num_inference_steps)
  log_sigmas = jnp.log(all_sigmas)
  if sigma_spacing == 'karras':
    lo, hi = all_sigmas[0]**(1 / 7), all_sigmas[-1]**(1 / 7)
    sigmas = (hi + ramp * (lo - hi))**7
  else:
    sigmas = jnp.exp(log_sigmas[-1] + ramp * (log_sigmas[0] - log_sigmas[-1]))
  # diffusers' _sigma_to_t: linear interpolation of t in log(sigma).
  log_sigma = jnp.log(jnp.maximum(sigmas, 1e-10))
  low = jnp.clip(jnp.searchsorted(log_sigmas, log_sigma, side='right') - 1, 0, len(abar) - 2)
  w = jnp.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
  timesteps = jnp.round(low + w).astype(jnp.int32)
  return timesteps, jnp.concatenate([sigmas, last])


def dpm_solver_plan(sigmas: jax.Array, final_sigmas_type: str = 'zero') -> Tuple[jax.Array, ...]:
  """Per-step inputs of `dpm_solver_step` from the [n + 1] `sigmas` of `dpm_solver_timesteps`.

  Returns (sigma_prev, sigma, sigma_next, second_order), each [n]: the previous, current and next
  noise levels, and whether the step is second order. As diffusers with solver_order=2 and
  lower_order_final=True: the first step is first order, and so is the last when it goes to
  sigma = 0 or when n < 15.
  """
  n = sigmas.shape[0] - 1
  second_order = np.arange(n) > 0
  if final_sigmas_type == 'zero' or n < 15:
    second_order[-1] = False
  sigma_prev = jnp.concatenate([sigmas[:1], sigmas[:-2]])  # Unused at step 0.
  return sigma_prev, sigmas[:-1], sigmas[1:], jnp.asarray(second_order)


def _alpha_sigma_lambda(sigma):
  alpha = 1 / jnp.sqrt(sigma**2 + 1)
  sigma_t = sigma * alpha
  return alpha, sigma_t, jnp.log(alpha) - jnp.log(sigma_t)


def dpm_solver_step(schedule: Schedule, model_output: jax.Array, sample: jax.Array,
                    prev_x0: jax.Array, sigma_prev: jax.Array, sigma: jax.Array,
                    sigma_next: jax.Array,
                    second_order: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """One DPM-Solver++(2M) midpoint update from `sigma` to `sigma_next`. Returns (prev_sample, x0).

  `prev_x0` is the x0 returned by the previous step (ignored when `second_order` is False).
  """
  sample, model_output = sample.astype(jnp.float32), model_output.astype(jnp.float32)
  alpha_s1, sigma_s1, lambda_s1 = _alpha_sigma_lambda(sigma_prev)
  alpha_s0, sigma_s0, lambda_s0 = _alpha_sigma_lambda(sigma)
  alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sigma_next)
  x0, _ = _x0_eps(model_output, sample, alpha_s0, sigma_s0, schedule.prediction_type)
  h = lambda_t - lambda_s0
  coef = alpha_t * (jnp.exp(-h) - 1.0)
  first = (sigma_t / sigma_s0) * sample - coef * x0
  # Inf/NaN when sigma_next = 0 (h = inf) or at step 0; jnp.where then keeps the first order update.
  r0 = (lambda_s0 - lambda_s1) / h
  second = first - 0.5 * coef * ((1.0 / r0) * (x0 - prev_x0))
  return jnp.where(second_order, second, first), x0


def guided_model_fn(apply_fn: Callable[[jax.Array, jax.Array], jax.Array],
                    guidance_scale: Union[None, float, jax.Array] = None,
                    condition: Optional[jax.Array] = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The `model_fn(x, t)` of `sample_loop` for a denoiser `apply_fn(x_in, timesteps [B])`.

  With a `guidance_scale` (classifier-free guidance), x is duplicated and `apply_fn` must hold the
  negative (unconditional) batch first, then the conditional one; the output is
  negative + w (positive - negative). `condition` (already duplicated for guidance) is concatenated to
  the latents along channels (interpolation keyframes, an upscaler's low-res frames).
  """
  do_cfg = guidance_scale is not None

  def model_fn(x, t):
    x_in = jnp.concatenate([x, x], axis=0) if do_cfg else x
    if condition is not None:
      x_in = jnp.concatenate([x_in, condition.astype(x_in.dtype)], axis=-1)
    out = apply_fn(x_in, jnp.broadcast_to(t, (x_in.shape[0],))).astype(jnp.float32)
    if do_cfg:
      negative, positive = jnp.split(out, 2, axis=0)
      out = negative + guidance_scale * (positive - negative)
    return out

  return model_fn


def sampler_options(sampler: str, *, eta: float = 0.0, key: Optional[jax.Array] = None,
                    clip_sample: bool = False, sigma_spacing: Optional[str] = None,
                    final_sigmas_type: str = 'zero') -> Dict[str, Any]:
  """The keyword arguments of `sample_loop` that belong to `sampler` (DDIM or DPM-Solver++)."""
  if sampler == 'dpmsolver++':
    return dict(sigma_spacing=sigma_spacing, final_sigmas_type=final_sigmas_type)
  return dict(eta=eta, key=key, clip_sample=clip_sample)


def sample_loop(model_fn: Callable[[jax.Array, jax.Array], jax.Array], latents: jax.Array,
                schedule: Schedule, num_inference_steps: int, *, sampler: str = 'ddim',
                eta: float = 0.0, key: Optional[jax.Array] = None,
                timestep_spacing: Optional[str] = None, steps_offset: Optional[int] = None,
                final_sigmas_type: str = 'zero', sigma_spacing: Optional[str] = None,
                clip_sample: bool = False, start_step: int = 0,
                on_step: Optional[Callable[[jax.Array, jax.Array], None]] = None) -> jax.Array:
  """Denoises `latents` [B, ...] (unit noise) into samples [B, ...] float32: one `lax.scan`.

  `model_fn(x, t)` takes float32 latents and an int32 scalar timestep and returns the (already
  guided) model output of `schedule.prediction_type`. `sampler`, `num_inference_steps` and `eta`
  are static Python values; `key` (needed when eta > 0) is split into one key per step.
  `timestep_spacing` / `steps_offset` default to the schedule's. DDIM only: `eta`, `clip_sample`.
  DPM-Solver++ only: `final_sigmas_type`, `sigma_spacing` (see `dpm_solver_timesteps`).
  `start_step` > 0 runs only the steps from that one on (image-to-image, SDEdit): `latents` are then
  data already noised to that step's level, as `noise_to_step` does; a DPM-Solver++ run restarts at
  first order there, having no previous step.
  `on_step(step_index, x)`, when given, is traced into the loop body after each step's update (int32
  index from `start_step` on, the new latents): e.g. a `jax.debug.callback`. None leaves the loop as
  it was.
  """
  _check('sampler', sampler, SAMPLERS)
  if not 0 <= start_step < num_inference_steps:
    raise ValueError(f'start_step={start_step} must be in [0, num_inference_steps='
                     f'{num_inference_steps}).')
  if eta < 0 or (eta > 0 and sampler != 'ddim'):
    raise ValueError(f'eta={eta}: eta must be >= 0 and is a DDIM option (sampler={sampler!r}).')
  if eta > 0 and key is None:
    raise ValueError('sample_loop with eta > 0 needs a PRNG `key`.')
  if sigma_spacing is not None and sampler != 'dpmsolver++':
    raise ValueError(f'sigma_spacing={sigma_spacing!r} is a DPM-Solver option (sampler={sampler!r}).')
  x = latents.astype(jnp.float32) * INIT_NOISE_SIGMA

  if sampler == 'ddim':
    timesteps = _ddim_timesteps(schedule, num_inference_steps, timestep_spacing,
                                steps_offset)[start_step:]
    keys = jax.random.split(key, timesteps.shape[0]) if eta > 0 else None

    def ddim_body(x, inputs):
      t, step_key, *index = inputs
      noise = jax.random.normal(step_key, x.shape, jnp.float32) if eta > 0 else None
      x, _ = ddim_step(schedule, model_fn(x, t), t, x, num_inference_steps, eta=eta,
                       variance_noise=noise, clip_sample=clip_sample)
      if on_step is not None:
        on_step(index[0], x)
      return x, None

    xs = (timesteps, keys) + _step_indices(on_step, start_step, num_inference_steps)
    x, _ = jax.lax.scan(ddim_body, x, xs)
    return x

  def dpm_body(carry, inputs):
    x, prev_x0 = carry
    t, *plan = inputs
    plan, index = plan[:4], plan[4:]  # sigma_prev, sigma, sigma_next, second_order; the index.
    x, x0 = dpm_solver_step(schedule, model_fn(x, t), x, prev_x0, *plan)
    if on_step is not None:
      on_step(index[0], x)
    return (x, x0), None

  timesteps, sigmas = dpm_solver_timesteps(
      schedule, num_inference_steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
      sigma_spacing=sigma_spacing, final_sigmas_type=final_sigmas_type)
  sigma_prev, sigma, sigma_next, second_order = dpm_solver_plan(sigmas, final_sigmas_type)
  second_order = second_order.at[start_step].set(False)
  plan = [v[start_step:] for v in (timesteps, sigma_prev, sigma, sigma_next, second_order)]
  xs = tuple(plan) + _step_indices(on_step, start_step, num_inference_steps)
  (x, _), _ = jax.lax.scan(dpm_body, (x, jnp.zeros_like(x)), xs)
  return x


def _step_indices(on_step, start_step: int, num_inference_steps: int) -> tuple:
  """The scan's extra input for `on_step`: the step indices (none without it)."""
  if on_step is None:
    return ()
  return (jnp.arange(start_step, num_inference_steps, dtype=jnp.int32),)


def _ddim_timesteps(schedule: Schedule, num_inference_steps: int,
                    timestep_spacing: Optional[str], steps_offset: Optional[int]) -> jax.Array:
  return jnp.asarray(inference_timesteps(
      num_inference_steps, schedule.num_train_timesteps,
      timestep_spacing or schedule.timestep_spacing,
      schedule.steps_offset if steps_offset is None else steps_offset))


def strength_start_step(num_inference_steps: int, strength: float) -> int:
  """The first step of an image-to-image run at `strength` in (0, 1] (1: from pure noise, step 0),
  as diffusers' img2img pipelines: the last int(n * strength) steps run (at least one here)."""
  if not 0.0 < strength <= 1.0:
    raise ValueError(f'strength={strength} must be in (0, 1].')
  return num_inference_steps - max(1, min(num_inference_steps, int(num_inference_steps * strength)))


def noise_to_step(schedule: Schedule, x0: jax.Array, noise: jax.Array, num_inference_steps: int,
                  start_step: int, *, sampler: str = 'ddim', timestep_spacing: Optional[str] = None,
                  steps_offset: Optional[int] = None, sigma_spacing: Optional[str] = None,
                  final_sigmas_type: str = 'zero') -> jax.Array:
  """Data `x0` noised to the level at which `sample_loop(..., start_step=start_step)` with the same
  sampler options begins (for DPM-Solver++ with `sigma_spacing`, the exact sigma of that step, not
  that of its rounded timestep)."""
  _check('sampler', sampler, SAMPLERS)
  x0, noise = x0.astype(jnp.float32), noise.astype(jnp.float32)
  if sampler == 'ddim':
    t = _ddim_timesteps(schedule, num_inference_steps, timestep_spacing, steps_offset)[start_step]
    return add_noise(schedule, x0, noise, t)
  _, sigmas = dpm_solver_timesteps(
      schedule, num_inference_steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
      sigma_spacing=sigma_spacing, final_sigmas_type=final_sigmas_type)
  alpha, sigma, _ = _alpha_sigma_lambda(sigmas[start_step])
  return alpha * x0 + sigma * noise
