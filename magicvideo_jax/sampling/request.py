"""What a sampling call means, resolved once: defaults from the checkpoint's config, checks, prompts.

`MagicVideoPipeline.__call__`, the cascade's stages (`KeyframeInterpolator`, `VideoUpscaler`), the
`sample` CLI, the evaluators and the training sample hook all call `resolve`, so a setting left out
means the same everywhere: the checkpoint's `config.sampling` (sampler, steps, guidance, eta, sigma
spacing) and `config.data` (frames, resolution, fps), and where a config lacks a key, the defaults of
`magicvideo_jax.config.base_config()`. `pipe(prompt)` and `python -m magicvideo_jax.sample --prompt
...` therefore sample the same video for the same checkpoint and seed.
"""

import dataclasses
import math
import numbers
from typing import Any, List, Optional, Sequence, Union

import ml_collections
import numpy as np
from PIL import Image

from magicvideo_jax import config as config_lib
from magicvideo_jax import diffusion

# 'uint8' / 'float' / 'latent': numpy [B, F, H, W, 3] uint8, the same float32 in [0, 1], the latents;
# 'np' (float32 in [0, 1], as diffusers' video pipelines) and 'pil' (per video a list of PIL frames).
OUTPUT_TYPES = ('uint8', 'float', 'np', 'pil', 'latent')
SEED_LIMIT = 2**63  # jax.random.key takes a 64-bit seed.

_BASE = config_lib.base_config()
# Scheduler options only converted diffusers configs carry; these values are diffusers' defaults.
_SCHEDULER_OPTIONS = dict(final_sigmas_type='zero', clip_sample=False, clip_sample_range=1.0)


@dataclasses.dataclass(frozen=True)
class Request:
  """One sampling call's settings, every default resolved and checked."""
  num_inference_steps: int
  guidance_scale: float
  sampler: str
  eta: float
  sigma_spacing: Optional[str]
  final_sigmas_type: str
  clip_sample: bool  # DDIM's x0 clipping to [-1, 1] (diffusers' clip_sample).
  fps: float
  seed: int
  output_type: str
  num_videos_per_prompt: int = 1
  num_frames: Optional[int] = None  # Base stage only: the clip size.
  height: Optional[int] = None
  width: Optional[int] = None

  @property
  def do_cfg(self) -> bool:
    """Classifier-free guidance runs only above 1 (at 1 the guided output is the conditional one)."""
    return self.guidance_scale > 1.0

  def static_options(self) -> dict:
    """The sampler options a jitted denoising loop is specialised on."""
    return dict(num_inference_steps=self.num_inference_steps, sampler=self.sampler, eta=self.eta,
                do_cfg=self.do_cfg, sigma_spacing=self.sigma_spacing,
                final_sigmas_type=self.final_sigmas_type)


def config_value(config: ml_collections.ConfigDict, section: str, key: str) -> Any:
  """`config[section][key]`, or the base config's default when the checkpoint's config lacks it."""
  values = config.get(section, None) or {}
  if key in values:
    return values[key]
  if section == 'sampling' and key in _SCHEDULER_OPTIONS:
    return _SCHEDULER_OPTIONS[key]
  return _BASE[section][key]


def _number(name: str, value: Any, *, low: Optional[float] = None, integer: bool = False,
            low_inclusive: bool = True) -> Any:
  kind = 'an integer' if integer else 'a number'
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f'{name}={value!r} must be {kind}')
  if integer:
    if not isinstance(value, numbers.Integral):
      raise ValueError(f'{name}={value!r} must be {kind}')
    value = int(value)
  else:
    value = float(value)
    if not math.isfinite(value):
      raise ValueError(f'{name}={value} must be finite')
  if low is not None and (value < low or (value == low and not low_inclusive)):
    raise ValueError(f'{name}={value} must be {">=" if low_inclusive else ">"} {low}')
  return value


def resolve(config: ml_collections.ConfigDict, *, num_inference_steps: Optional[int] = None,
            guidance_scale: Optional[float] = None, sampler: Optional[str] = None,
            eta: Optional[float] = None, sigma_spacing: Optional[str] = None,
            fps: Optional[float] = None, seed: int = 0, output_type: str = 'uint8',
            num_frames: Optional[int] = None, height: Optional[int] = None,
            width: Optional[int] = None, num_videos_per_prompt: int = 1,
            geometry: bool = False) -> Request:
  """The request with every None replaced by the checkpoint's default; ValueError naming a bad value.

  `geometry=True` (the base stage) also resolves the clip size (num_frames, height, width; defaults
  config.data.num_frames and config.data.resolution); the later stages take theirs from their input.
  eta defaults to config.sampling.eta with DDIM and to 0 with another sampler; sigma_spacing to
  config.sampling.sigma_spacing with DPM-Solver++ (DDIM has none).
  """
  sampler = sampler or config_value(config, 'sampling', 'sampler')
  if sampler not in diffusion.SAMPLERS:
    raise ValueError(f'unknown sampler {sampler!r}; valid: {", ".join(diffusion.SAMPLERS)}')
  if num_inference_steps is None:
    num_inference_steps = config_value(config, 'sampling', 'num_inference_steps')
  total = int(config_value(config, 'diffusion', 'num_train_timesteps'))
  steps = _number('num_inference_steps', num_inference_steps, low=1, integer=True)
  if steps > total:
    raise ValueError(f'num_inference_steps={steps} must be an integer in [1, {total}]')
  if guidance_scale is None:
    guidance_scale = config_value(config, 'sampling', 'guidance_scale')
  guidance_scale = _number('guidance_scale', guidance_scale, low=0.0)
  if eta is None:
    eta = config_value(config, 'sampling', 'eta') if sampler == 'ddim' else 0.0
  eta = _number('eta', eta, low=0.0)
  if eta > 0 and sampler != 'ddim':
    raise ValueError(f'eta={eta}: must be >= 0, and > 0 only with sampler="ddim"')
  if sigma_spacing is None and sampler == 'dpmsolver++':
    sigma_spacing = config_value(config, 'sampling', 'sigma_spacing')
  if sigma_spacing is not None:
    if sampler != 'dpmsolver++':
      raise ValueError(f'sigma_spacing={sigma_spacing!r} needs sampler="dpmsolver++"')
    if sigma_spacing not in diffusion.SIGMA_SPACINGS:
      raise ValueError(f'unknown sigma_spacing {sigma_spacing!r}; valid: '
                       f'{", ".join(diffusion.SIGMA_SPACINGS)}')
  clip_sample = bool(config_value(config, 'sampling', 'clip_sample')) and sampler == 'ddim'
  if clip_sample and float(config_value(config, 'sampling', 'clip_sample_range')) != 1.0:
    raise ValueError('config.sampling.clip_sample_range other than 1.0 is not supported')
  fps = _number('fps', config_value(config, 'data', 'fps') if fps is None else fps, low=0.0,
                low_inclusive=False)
  seed = _number('seed', seed, integer=True)
  if not -SEED_LIMIT <= seed < SEED_LIMIT:
    raise ValueError(f'seed={seed} must be in [-2**63, 2**63)')
  if output_type not in OUTPUT_TYPES:
    raise ValueError(f'output_type={output_type!r}; valid: {", ".join(OUTPUT_TYPES)}')
  num_videos_per_prompt = _number('num_videos_per_prompt', num_videos_per_prompt, low=1,
                                  integer=True)
  sizes = {}
  if geometry:
    resolution = config_value(config, 'data', 'resolution')
    sizes = dict(
        num_frames=_number('num_frames', config_value(config, 'data', 'num_frames')
                           if num_frames is None else num_frames, low=1, integer=True),
        height=_number('height', resolution if height is None else height, low=1, integer=True),
        width=_number('width', resolution if width is None else width, low=1, integer=True))
  return Request(num_inference_steps=steps, guidance_scale=guidance_scale, sampler=sampler, eta=eta,
                 sigma_spacing=sigma_spacing,
                 final_sigmas_type=config_value(config, 'sampling', 'final_sigmas_type'),
                 clip_sample=clip_sample, fps=fps, seed=seed, output_type=output_type,
                 num_videos_per_prompt=num_videos_per_prompt, **sizes)


def prompt_list(prompt: Union[str, Sequence[str]], name: str = 'prompt') -> List[str]:
  """A prompt or a non-empty list of prompts -> the list."""
  prompts = [prompt] if isinstance(prompt, str) else prompt
  if not isinstance(prompts, (list, tuple)) or not prompts or not all(
      isinstance(p, str) for p in prompts):
    raise ValueError(f'{name} must be a string or a non-empty list of strings')
  return list(prompts)


def per_clip(value: Union[None, str, Sequence[str]], batch: int, name: str = 'negative_prompt'
             ) -> List[str]:
  """One string for every clip or one per clip -> `batch` strings; None gives "" (the unconditional
  prompt, as diffusers)."""
  values = prompt_list('' if value is None else value, name)
  if len(values) == 1:
    values = values * batch
  if len(values) != batch:
    what = 'clips' if name == 'prompt' else 'prompts'
    raise ValueError(f'{len(values)} {name.replace("_", " ")}s for {batch} {what}')
  return values


def per_video(values: Sequence[Any], num_videos_per_prompt: int) -> List[Any]:
  """Each prompt (or negative prompt) repeated for its videos, consecutively as diffusers orders
  them: [p0] * n + [p1] * n + ..."""
  return [v for v in values for _ in range(num_videos_per_prompt)]


def embeddings(value: Any, expected: Sequence[int], name: str = 'prompt_embeds',
               batch: Optional[int] = None, dtype: Any = np.float32) -> np.ndarray:
  """Precomputed text-encoder outputs `[B, L, D]` -> numpy of `dtype` (the encoder's), checked
  against the `[L, D]` (`expected`) of the pipeline's encoding and, when given, the batch (1 or
  `batch`)."""
  array = np.asarray(value, np.float32)
  tail = tuple(int(d) for d in expected)
  if array.ndim != 3 or array.shape[1:] != tail or not array.shape[0]:
    raise ValueError(f'{name} have shape {array.shape}; expected [B, {tail[0]}, {tail[1]}] (what '
                     'encode_prompt returns)')
  if batch is not None and array.shape[0] not in (1, batch):
    raise ValueError(f'{name} have batch {array.shape[0]}; expected 1 or {batch} (one per prompt)')
  if not np.isfinite(array).all():
    raise ValueError(f'{name} have non-finite values')
  return np.asarray(value).astype(dtype) if np.dtype(dtype) != np.float32 else array


def to_output(frames: Any, output_type: str) -> Any:
  """Frames `[B, F, H, W, 3]` in [0, 1] as the output type asks: 'float' as they are, 'np' float32
  numpy, 'uint8' rounded, 'pil' a list per video of its frames as RGB `PIL.Image`s (of the uint8)."""
  if output_type == 'float':
    return frames
  if output_type == 'np':
    return np.asarray(frames, np.float32)
  if output_type not in ('uint8', 'pil'):
    raise ValueError(f'output_type={output_type!r} is not a frame type; valid: uint8, float, np, pil')
  uint8 = np.clip(np.round(np.asarray(frames) * 255.0), 0, 255).astype(np.uint8)
  if output_type == 'uint8':
    return uint8
  return [[Image.fromarray(frame) for frame in video] for video in uint8]


def first_frames(image: Any, count: int, height: int, width: int) -> np.ndarray:
  """A given first frame (one image for all `count` videos, or one per video; uint8, float in
  [0, 1] or PIL) -> float32 `[count, 1, height, width, 3]` in [0, 1]."""
  if hasattr(image, 'convert'):  # PIL
    image = np.asarray(image.convert('RGB'))
  frames = np.asarray(image)
  if frames.dtype == np.uint8:
    frames = frames.astype(np.float32) / 255.0
  frames = frames.astype(np.float32)
  if frames.ndim == 3:
    frames = np.broadcast_to(frames, (count,) + frames.shape)
  if frames.ndim != 4 or frames.shape != (count, height, width, 3):
    raise ValueError(f'image has shape {np.shape(image)}; expected [{height}, {width}, 3] or '
                     f'[{count}, {height}, {width}, 3] (the call\'s height and width)')
  if frames.min() < 0.0 or frames.max() > 1.0:
    raise ValueError('image: float values must be in [0, 1] (or pass uint8)')
  return np.ascontiguousarray(frames[:, None])
