r"""Text-to-video from the command line.

  python -m magicvideo_jax.sample --checkpoint DIR --prompt "a red circle moving left" --output out.mp4

DIR is a checkpoint folder (`python -m magicvideo_jax.convert` or a training export), a training
workdir, a diffusers SD folder (converted on the fly, video layers at identity init), or a cascade folder
(base/, interpolation/, upscaler/; see magicvideo_jax/cascade.py), or a CMD checkpoint (content frame,
then motion latent: configs/cmd_shapes.py). --interpolation DIR and --upscaler DIR
add the cascade's stages (keyframe interpolation, then super-resolution), each with its own steps and
guidance; the file's frame rate is then the interpolated one. Options left
out default to the checkpoint's `config.sampling` (steps, guidance scale, sampler, eta) and
`config.data` (frames, resolution, fps). Several --prompt flags make one grid video (one tile per
prompt, in order, left to right, top to bottom), or numbered files OUTPUT_0.mp4, OUTPUT_1.mp4, ...
with --separate. Progress (load, compile, denoising, decode) goes to stderr; the written path(s) to
stdout. User errors end with a one-line message and exit status 2.
"""

import argparse
import math
import os
import sys
from typing import List, Optional, Sequence

from magicvideo_jax import video_io
from magicvideo_jax.sampling import cascade
from magicvideo_jax.sampling import image_to_video
from magicvideo_jax.sampling import long_video
from magicvideo_jax.sampling import pipeline as pipeline_lib
from magicvideo_jax.weights import hub
from magicvideo_jax.weights import torch_layout

VIDEO_EXTENSIONS = video_io.VIDEO_EXTENSIONS
SAMPLERS = ('ddim', 'dpmsolver++')  # = diffusion.SAMPLERS; repeated so --help needs no jax import.
SIGMA_SPACINGS = ('karras', 'lu_lambdas')


class UserError(Exception):
  """A bad flag or checkpoint: reported in one line, no traceback."""


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m magicvideo_jax.sample', description='\n\n'.join(__doc__.split('\n\n')[:2]),
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n', 2)[2])
  parser.add_argument('--checkpoint', required=True,
                      help='checkpoint folder, training workdir or diffusers folder')
  parser.add_argument('--prompt', action='append', required=True,
                      help='text prompt; repeat the flag for several videos (a grid, or numbered files '
                      'with --separate)')
  parser.add_argument('--output', required=True,
                      help=f'video file to write ({", ".join(VIDEO_EXTENSIONS)})')
  parser.add_argument('--negative_prompt', default=None,
                      help='what to steer away from (default: the empty, unconditional prompt)')
  parser.add_argument('--num_frames', type=int, help='frames per clip (default: config.data)')
  parser.add_argument('--height', type=int, help='pixels (default: config.data.resolution)')
  parser.add_argument('--width', type=int, help='pixels (default: config.data.resolution)')
  parser.add_argument('--steps', type=int, help='sampler steps (default: config.sampling)')
  parser.add_argument('--guidance_scale', type=float,
                      help='classifier-free guidance scale; <= 1 disables it (default: config.sampling)')
  parser.add_argument('--sampler', choices=SAMPLERS, help='default: config.sampling.sampler')
  parser.add_argument('--sigma_spacing', choices=SIGMA_SPACINGS,
                      help='dpmsolver++ only: noise-level spacing')
  parser.add_argument('--eta', type=float, help='DDIM stochasticity, 0 = deterministic (default: config)')
  parser.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
  parser.add_argument('--fps', type=float,
                      help='frame rate: fps conditioning of the model and of the file (default: '
                      'config.data.fps)')
  parser.add_argument('--num_frames_model', type=int, default=None,
                      help='diffusers folders only: frames the fresh video layers support (default 16)')
  parser.add_argument('--separate', action='store_true',
                      help='several prompts: write OUTPUT_0.ext, OUTPUT_1.ext, ... instead of a grid')
  parser.add_argument('--upscale', type=int, default=1,
                      help='enlarge the frames N times (nearest neighbour) for viewing')
  parser.add_argument('--image', default=None,
                      help='the first frame (an image file at the output size): the video starts '
                      'from it (an image-to-video model is conditioned on it; any other model '
                      'takes it as known latents, sampling/pipeline.py)')
  parser.add_argument('--long_video', choices=long_video.METHODS, default=None,
                      help='--num_frames beyond the model\'s length: causal (window by window, each '
                      'continuing from the last frames of the one before) or freenoise (all frames '
                      'at once, the U-Net on overlapping windows; sampling/long_video.py)')
  parser.add_argument('--long_video_overlap', type=int, default=None,
                      help='frames each window shares with the previous (default: half the model\'s)')
  parser.add_argument('--lora', default=None,
                      help='LoRA file or folder (diffusers / PEFT safetensors, e.g. from convert '
                      '--export_lora_from) added to the weights')
  parser.add_argument('--lora_scale', type=float, default=1.0, help='its scale (default 1)')
  parser.add_argument('--motion_guidance_scale', type=float, default=None,
                      help='CMD checkpoints: the motion DiT\'s text guidance (default: '
                           'config.sampling.motion_guidance_scale)')
  cascade = parser.add_argument_group('cascade stages (magicvideo_jax/cascade.py)')
  cascade.add_argument('--interpolation', default=None,
                       help='keyframe interpolation model folder: K keyframes -> (K - 1) m + 1 frames')
  cascade.add_argument('--interpolation_steps', type=int,
                       help='its sampler steps (default: its config.sampling)')
  cascade.add_argument('--interpolation_guidance_scale', type=float,
                       help='its text guidance (default: its config.sampling)')
  cascade.add_argument('--upscaler', default=None,
                       help='super-resolution model folder (a converted SD x4 upscaler or a trained one)')
  cascade.add_argument('--upscale_steps', type=int, help='its sampler steps (default: its config)')
  cascade.add_argument('--upscale_guidance_scale', type=float,
                       help='its text guidance (default: its config.sampling)')
  cascade.add_argument('--noise_level', type=int,
                       help='noise augmentation level of its low-res input (default: its config)')
  cascade.add_argument('--upscale_strength', type=float,
                       help='in (0, 1]: below 1 it starts from its upsampled input noised to that '
                       'fraction of the steps, instead of pure noise (default: its config)')
  return parser


def output_paths(output: str, count: int, separate: bool) -> List[str]:
  if not separate or count == 1:
    return [output]
  stem, ext = os.path.splitext(output)
  return [f'{stem}_{i}{ext}' for i in range(count)]


def request_settings(args: argparse.Namespace) -> dict:
  """The sampling flags as pipeline keyword arguments; a flag left out stays None, so the pipeline
  takes the checkpoint's default exactly as `pipe(prompt)` does (sampling/request.py)."""
  return dict(num_frames=args.num_frames, height=args.height, width=args.width,
              num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
              sampler=args.sampler, eta=args.eta, fps=args.fps, seed=args.seed,
              sigma_spacing=args.sigma_spacing)


def check_flags(args: argparse.Namespace) -> None:
  """Checks that need no jax (fast failure)."""
  try:  # A Hub id: its folder in the local Hugging Face cache.
    checkpoint = hub.resolve(args.checkpoint)
  except FileNotFoundError as e:
    raise UserError(str(e)) from None
  if not os.path.isdir(checkpoint):
    raise UserError(f'checkpoint folder not found: {args.checkpoint}')
  ext = os.path.splitext(args.output)[1].lower()
  if ext not in VIDEO_EXTENSIONS:
    raise UserError(f'--output {args.output}: unsupported extension {ext or "(none)"!r}; use one of '
                    f'{", ".join(VIDEO_EXTENSIONS)}')
  if os.path.isdir(args.output):
    raise UserError(f'--output {args.output} is a directory; give a file name such as '
                    f'{os.path.join(args.output, "video" + (ext or ".mp4"))}')
  parent = os.path.dirname(os.path.abspath(args.output))
  existing = parent
  while not os.path.exists(existing):  # The folders to be created must be creatable.
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f'--output {args.output}: cannot write into {existing} (not a writable folder)')
  if args.upscale < 1:
    raise UserError(f'--upscale={args.upscale} must be >= 1')
  if args.fps is not None and args.fps <= 0:
    raise UserError(f'--fps={args.fps} must be > 0')
  if args.num_frames_model is not None and args.num_frames_model < 1:
    raise UserError(f'--num_frames_model={args.num_frames_model} must be >= 1')
  if args.image is not None and not os.path.isfile(args.image):
    raise UserError(f'--image: file not found: {args.image}')
  if args.lora is not None and not os.path.exists(args.lora):
    raise UserError(f'--lora: not found: {args.lora}')
  for flag in ('interpolation', 'upscaler'):
    folder = getattr(args, flag)
    if folder is not None and not os.path.isdir(folder):
      raise UserError(f'--{flag}: folder not found: {folder}')
  for flag in ('interpolation_steps', 'upscale_steps'):
    if getattr(args, flag) is not None and getattr(args, flag) < 1:
      raise UserError(f'--{flag}={getattr(args, flag)} must be >= 1')


def run(args: argparse.Namespace) -> List[str]:
  """Generates and writes the video(s); returns the written paths."""
  check_flags(args)
  try:  # Validate against the configs before loading any weights.
    base, interpolation, upscaler = cascade.resolve_folders(args.checkpoint, args.interpolation,
                                                            args.upscaler)
    config = pipeline_lib.load_config(base, args.num_frames_model)
    if image_to_video.is_image_to_video_config(config) and not args.image:
      raise ValueError(f'--image is required: {base} is an image-to-video model (it generates '
                       'from a given first frame)')
    kwargs = request_settings(args)
    # A long video is checked window by window (one window here; its length in long_video.py).
    req = pipeline_lib.validate_request(
        config, **dict(kwargs, num_frames=None) if args.long_video else kwargs)
    if args.long_video:
      long_video.check(pipeline_lib.max_frames(config), args.num_frames or req.num_frames,
                       args.long_video_overlap)
    interpolation_config, upscaler_config = cascade.stage_configs(interpolation, upscaler)
    cascade.check_configs(config, interpolation_config, upscaler_config,
                          num_frames=req.num_frames, height=req.height, width=req.width,
                          noise_level=args.noise_level, upscale_strength=args.upscale_strength)
    pipe = pipeline_lib.MagicVideoPipeline.from_pretrained(
        base, num_frames=args.num_frames_model, verbose=True, interpolation=interpolation,
        upscaler=upscaler)
    if args.lora:
      pipe.load_lora_weights(args.lora, scale=args.lora_scale)
    if args.motion_guidance_scale is not None:
      if not isinstance(pipe, pipeline_lib.CMDPipeline):
        raise ValueError('--motion_guidance_scale: only a CMD checkpoint has a motion model')
      kwargs['motion_guidance_scale'] = args.motion_guidance_scale
  except (ValueError, FileNotFoundError, torch_layout.ConversionError) as e:
    raise UserError(str(e)) from None
  if args.long_video:
    kwargs.update(long_video=args.long_video, long_video_overlap=args.long_video_overlap)
  if args.image:
    try:
      kwargs['image'] = video_io.read_image(args.image)
    except (OSError, ValueError) as e:
      raise UserError(f'--image {args.image}: cannot read it ({e})') from None
  num_frames = args.num_frames if args.long_video and args.num_frames else req.num_frames
  kwargs.update(negative_prompt=args.negative_prompt, interpolation_steps=args.interpolation_steps,
                interpolation_guidance_scale=args.interpolation_guidance_scale,
                upscale_steps=args.upscale_steps, upscale_guidance_scale=args.upscale_guidance_scale,
                noise_level=args.noise_level, upscale_strength=args.upscale_strength)
  file_fps = req.fps * (pipe.interpolator.factor if pipe.interpolator else 1)
  stages = ''.join(f' -> {name}' for name, stage in (('interpolation', pipe.interpolator),
                                                      ('super-resolution', pipe.upscaler)) if stage)
  print(f'sampling {len(args.prompt)} prompt(s): {num_frames} frames of {req.height}x{req.width}, '
        f'{req.num_inference_steps} {req.sampler} steps, guidance {req.guidance_scale}, seed '
        f'{req.seed}{stages}', file=sys.stderr)
  try:
    videos = pipe(args.prompt, **kwargs)  # [B, F, H, W, 3] uint8
  except ValueError as e:  # A long video's window settings.
    raise UserError(str(e)) from None
  videos = video_io.upscale_nearest(videos, args.upscale)
  paths = output_paths(args.output, len(args.prompt), args.separate)
  if len(paths) == 1 and len(videos) > 1:
    grid = video_io.tile_videos(videos, columns=math.ceil(math.sqrt(len(videos))))
    video_io.write_video(paths[0], grid, fps=file_fps)
  else:
    video_io.write_videos(paths, videos, fps=file_fps)
  return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    paths = run(args)
  except UserError as e:
    print(f'{parser.prog}: error: {e}', file=sys.stderr)
    return 2
  except video_io.VideoWriteError as e:  # After the sampling work: the disk, not the flags.
    print(f'{parser.prog}: error: {e}', file=sys.stderr)
    return 1
  for path in paths:
    print(os.path.abspath(path))
  return 0


if __name__ == '__main__':
  sys.exit(main())
