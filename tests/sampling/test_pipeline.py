"""MagicVideoPipeline and the sample CLI, end to end against diffusers' StableDiffusionPipeline.

The pipeline loads the tiny random diffusers folder of `conftest.tiny_sd_dir` (converted on the fly,
video layers at identity init), so with the same prompts, initial latents and DDIM schedule each frame
must reproduce the reference image. Errors are max |ours - reference| on [0, 1] images. Runs on the 8
fake devices of conftest: the prompt batch is padded to 8 and sharded.
"""

import os
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

from magicvideo_jax import MagicVideoPipeline  # The lazy package-level import.
from magicvideo_jax.weights import torch_layout
from magicvideo_jax.sampling import cascade
from magicvideo_jax.sampling import pipeline as pipeline_lib
from magicvideo_jax.sampling import request as request_lib
from magicvideo_jax import sample
from magicvideo_jax import video_io
from magicvideo_jax.models import video_vae
from magicvideo_jax.weights import surgery

PROMPTS = ['a red circle', 'the red line']
NEGATIVE = 'a circle'
SIZE, LATENT, STEPS, GUIDANCE = 32, 16, 4, 7.5  # The tiny VAE downsamples by 2.
TOLERANCE = 2e-3
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def torch_latents(latents):
  """Ours `[N, h, w, C]` -> torch NCHW."""
  return torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2)))


@pytest.fixture(scope='module')
def setup(tiny_sd_dir):
  """Our pipeline (from the diffusers folder), the reference, and fixed initial latents."""
  torch.set_num_threads(1)
  reference = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
  reference.set_progress_bar_config(disable=True)
  # verbose=False: progress callbacks keep executables out of JAX's persistent compilation cache
  # (the CLI test covers the progress output).
  pipe = MagicVideoPipeline.from_pretrained(tiny_sd_dir, num_frames=4)
  rng = np.random.default_rng(0)
  return types.SimpleNamespace(
      reference=reference, pipe=pipe,
      latents1=rng.standard_normal((2, 1, LATENT, LATENT, 4)).astype(np.float32),  # [B, F, h, w, C]
      latents3=rng.standard_normal((1, 3, LATENT, LATENT, 4)).astype(np.float32))


def run_reference(setup, prompt, latents, **kwargs):
  """diffusers on `latents` `[N, h, w, C]` -> `[N, H, W, 3]` float in [0, 1]."""
  with torch.no_grad():
    return setup.reference(prompt, latents=torch_latents(latents), num_inference_steps=STEPS,
                           height=SIZE, width=SIZE, output_type='np', **kwargs).images


def run_ours(pipe, prompt, latents=None, **kwargs):
  kwargs = dict(dict(num_frames=latents.shape[1] if latents is not None else 1, height=SIZE,
                     width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE), **kwargs)
  return pipe(prompt, latents=latents, **kwargs)


@pytest.fixture(scope='module')
def video3(setup):
  """3 frames of PROMPTS[0] with no negative prompt (so "" is the unconditional one), float."""
  return run_ours(setup.pipe, PROMPTS[0], setup.latents3, output_type='float')


def test_single_frame_matches_diffusers(setup):
  assert setup.pipe.mesh.size == len(jax.devices()) == 8  # Batch of 2 padded to 8 and sharded.
  ours = run_ours(setup.pipe, PROMPTS, setup.latents1, negative_prompt=NEGATIVE, output_type='float')
  expected = run_reference(setup, PROMPTS, setup.latents1[:, 0], negative_prompt=[NEGATIVE] * 2,
                           guidance_scale=GUIDANCE)
  err = float(np.abs(ours[:, 0] - expected).max())
  print(f'F=1, 2 prompts, negative prompt, DDIM {STEPS} steps: max abs err {err:.2e} '
        f'(image std {expected.std():.3f})')
  assert ours.shape == (2, 1, SIZE, SIZE, 3) and ours.dtype == np.float32
  assert err <= TOLERANCE
  assert expected.std() > 0.05  # Not a degenerate (flat) image.


def test_video_frames_match_diffusers_images(setup, video3):
  """At identity init the video model is the image model per frame (same per-frame latents)."""
  expected = run_reference(setup, PROMPTS[0], setup.latents3[0], num_images_per_prompt=3,
                           guidance_scale=GUIDANCE)  # negative_prompt=None: "" as ours.
  err = float(np.abs(video3[0] - expected).max())
  print(f'F=3 video vs 3 reference images: max abs err {err:.2e}')
  assert video3.shape == (1, 3, SIZE, SIZE, 3)
  assert err <= TOLERANCE
  assert np.abs(video3[0, 0] - video3[0, 1]).max() > 0.05  # Frames differ (different latents).


def test_guidance_scale_one_is_conditional_only(setup):
  ours = run_ours(setup.pipe, PROMPTS, setup.latents1, negative_prompt=NEGATIVE, guidance_scale=1.0,
                  output_type='float')
  expected = run_reference(setup, PROMPTS, setup.latents1[:, 0], guidance_scale=1.0)
  guided = run_reference(setup, PROMPTS, setup.latents1[:, 0], guidance_scale=GUIDANCE)
  err = float(np.abs(ours[:, 0] - expected).max())
  print(f'guidance_scale=1 vs diffusers conditional-only: max abs err {err:.2e}')
  assert err <= TOLERANCE
  assert np.abs(expected - guided).max() > 0.05  # Guidance matters for this model.


def test_seeds_and_no_recompile(setup):
  pipe = setup.pipe
  first = run_ours(setup.pipe, PROMPTS, seed=0)
  traces, compiled = pipe.trace_count, len(pipe.compiled)
  again = run_ours(setup.pipe, PROMPTS, seed=0)
  other = run_ours(setup.pipe, PROMPTS, seed=1)
  new_prompt = run_ours(setup.pipe, ['a blue line', 'red'], negative_prompt='the', seed=5,
                        guidance_scale=5.0)
  assert first.dtype == np.uint8 and first.shape == (2, 1, SIZE, SIZE, 3)
  np.testing.assert_array_equal(first, again)
  assert np.abs(first.astype(int) - other).max() > 10
  assert np.abs(first.astype(int) - new_prompt).max() > 10
  assert (pipe.trace_count, len(pipe.compiled)) == (traces, compiled), 'recompiled'


def test_empty_and_long_prompts(setup):
  long_prompt = ' '.join(['red circle'] * 60)  # About 120 tokens.
  with pytest.warns(UserWarning, match=r'truncated to 77'):
    out = run_ours(setup.pipe, ['', long_prompt], seed=2)
  assert out.shape == (2, 1, SIZE, SIZE, 3)
  # Truncation keeps the first 77 tokens: a prompt with the same first 77 tokens gives the same video.
  with pytest.warns(UserWarning, match=r'truncated to 77'):
    same = run_ours(setup.pipe, ['', long_prompt + ' the line'], seed=2)
  np.testing.assert_array_equal(out, same)


def test_bad_inputs(setup, tmp_path):
  pipe = setup.pipe
  traces = pipe.trace_count
  ok = dict(num_frames=1, height=SIZE, width=SIZE, num_inference_steps=STEPS)
  cases = [
      (dict(prompt=[]), 'non-empty'),
      (dict(prompt='a', num_frames=pipe.max_frames + 1), r'num_frames=5 is more than .* \(4'),
      (dict(prompt='a', num_frames=0), 'num_frames'),
      (dict(prompt='a', height=SIZE + 2), 'height=34 must be a positive multiple of 4'),
      (dict(prompt='a', width=SIZE - 1), 'width=31'),
      (dict(prompt='a', sampler='euler'), "unknown sampler 'euler'"),
      (dict(prompt='a', sampler='ddim', sigma_spacing='karras'), 'dpmsolver'),
      (dict(prompt='a', output_type='pt'), 'output_type'),
      (dict(prompt=['a', 'b'], negative_prompt=['x', 'y', 'z']), '3 negative prompts for 2'),
      (dict(prompt='a', latents=np.zeros((1, 1, 8, 8, 4), np.float32)), 'latents have shape'),
      (dict(prompt='a', eta=0.5, sampler='dpmsolver++'), 'eta'),
      (dict(prompt='a', num_videos_per_prompt=0), 'num_videos_per_prompt=0 must be >= 1'),
      (dict(prompt=['a', 'b'], num_videos_per_prompt=2, latents=np.zeros((2, 1, 16, 16, 4))),
       r'latents have shape \(2, .*B = 2 prompts x num_videos_per_prompt 2'),
      (dict(prompt=None), 'or pass prompt_embeds'),
      (dict(prompt='a', prompt_embeds=np.zeros((1, 77, 32))), 'prompt or prompt_embeds, not both'),
      (dict(prompt='a', negative_prompt='b', negative_prompt_embeds=np.zeros((1, 77, 32))),
       'not both'),
      (dict(prompt_embeds=np.zeros((1, 77, 16))), r'prompt_embeds have shape \(1, 77, 16\); '
       r'expected \[B, 77, 32\]'),
      (dict(prompt=['a', 'b'], negative_prompt_embeds=np.zeros((3, 77, 32))),
       'negative_prompt_embeds have batch 3; expected 1 or 2'),
      (dict(prompt='a', callback_on_step_end=3), 'must be callable'),
  ]
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      pipe(**dict(ok, **kwargs))
  # The cascade's stages encode prompts themselves (a stand-in stage: rejected before it is used).
  pipe.upscaler = object()
  try:
    with pytest.raises(ValueError, match="the cascade's stages encode the prompts"):
      pipe(prompt_embeds=np.zeros((1, 77, 32)), **ok)
  finally:
    pipe.upscaler = None
  assert pipe.trace_count == traces  # Rejected before any tracing.
  with pytest.raises(FileNotFoundError, match='not found'):
    MagicVideoPipeline.from_pretrained(str(tmp_path / 'missing'))
  with pytest.raises(FileNotFoundError, match='neither'):
    MagicVideoPipeline.from_pretrained(str(tmp_path))


def test_video_files(video3, tmp_path):
  frames = video_io.to_uint8(video3[0])
  for ext in ('mp4', 'gif'):
    path = video_io.write_video(str(tmp_path / f'clip.{ext}'), frames, fps=4)
    back = video_io.read_video(path)
    print(f'{ext}: {os.path.getsize(path)} bytes, mean abs diff {np.abs(back - frames.astype(int)).mean():.1f}')
    assert back.shape == frames.shape and back.dtype == np.uint8


def test_video_vae_decodes_clips(setup, video3):
  """With `model.video_vae.enabled` the frames are decoded together (`decode_video`); at identity
  init that equals the per-frame decode, and perturbed temporal layers change it."""
  config = ml_collections.ConfigDict(setup.pipe.config.to_dict())
  config.model.video_vae = dict(enabled=True, num_frames=4, temporal_conv=True,
                                temporal_attention=True)
  # build_video_vae without the `enabled` switch (the VideoAutoencoderKL fields only).
  fields = ml_collections.ConfigDict(config.to_dict())
  del fields.model.video_vae['enabled']
  modules = dict(setup.pipe.modules, vae=video_vae.build_video_vae(fields.model))
  params = surgery.grow_video_params(config, jax.device_get(setup.pipe.params), modules)
  video_leaves = [p for p in torch_layout.iter_paths(params['vae']) if torch_layout.is_video_only(p)]
  assert video_leaves and all('decoder' in p for p in video_leaves)
  pipe = MagicVideoPipeline(config, params, setup.pipe.tokenizer, modules=modules)
  assert pipe.video_vae
  got = run_ours(pipe, PROMPTS[0], setup.latents3, output_type='float')
  err = float(np.abs(got - video3).max())
  print(f'VideoVAE at identity init vs per-frame decode: max abs err {err:.2e}')
  assert err <= 1e-4
  # Perturb the temporal output projections: the frames now mix.
  perturbed = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.5 if 'temporal' in jax.tree_util.keystr(path) and 'to_out' in
      jax.tree_util.keystr(path) else x, params)
  pipe.params = jax.device_put(perturbed, pipe.params_sharding)
  mixed = run_ours(pipe, PROMPTS[0], setup.latents3, output_type='float')
  assert np.abs(mixed - video3).max() > 1e-2


def test_dpm_solver_karras_matches_diffusers(setup):
  reference = setup.reference
  ddim = reference.scheduler
  reference.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
      ddim.config, use_karras_sigmas=True)
  try:
    expected = run_reference(setup, PROMPTS, setup.latents1[:, 0], negative_prompt=[NEGATIVE] * 2,
                             guidance_scale=GUIDANCE)
  finally:
    reference.scheduler = ddim
  ours = run_ours(setup.pipe, PROMPTS, setup.latents1, negative_prompt=NEGATIVE, sampler='dpmsolver++',
                  sigma_spacing='karras', output_type='float')
  err = float(np.abs(ours[:, 0] - expected).max())
  print(f'DPM-Solver++(2M) karras, {STEPS} steps: max abs err {err:.2e}')
  assert err <= TOLERANCE


# --------------------------------------------------------------------------------------------------
# diffusers-style arguments: output types, return_dict, num_videos_per_prompt, prompt embeddings,
# the step callback. Same shapes as above (a batch of up to 8 pads to the 8 devices): no new programs
# but the callback's.


def test_output_types_and_return_dict(setup, video3):
  """'np' is the float output; 'pil' frames are the uint8 rounding of it; return_dict wraps any
  output type, 'latent' the latents that decode to the same frames."""
  pipe = setup.pipe
  as_np = run_ours(pipe, PROMPTS[0], setup.latents3, output_type='np')
  assert isinstance(as_np, np.ndarray) and as_np.dtype == np.float32
  np.testing.assert_array_equal(as_np, video3)
  out = run_ours(pipe, PROMPTS[0], setup.latents3, output_type='pil', return_dict=True)
  assert isinstance(out, pipeline_lib.MagicVideoPipelineOutput)
  expected = np.clip(np.round(video3 * 255.0), 0, 255).astype(np.uint8)
  assert len(out.frames) == 1 and len(out.frames[0]) == 3
  for f, image in enumerate(out.frames[0]):
    assert image.mode == 'RGB' and image.size == (SIZE, SIZE)
    np.testing.assert_array_equal(np.asarray(image), expected[0, f])
  latents = run_ours(pipe, PROMPTS[0], setup.latents3, output_type='latent', return_dict=True).frames
  assert latents.shape == (1, 3, LATENT, LATENT, 4)
  np.testing.assert_array_equal(pipe.decode(latents), video3)


def test_num_videos_per_prompt(setup):
  """n videos per prompt, consecutive (as diffusers), negatives repeated alike: the same videos as
  each prompt called on its own with its slice of the latents."""
  pipe = setup.pipe
  latents = np.random.default_rng(1).standard_normal((4, 1, LATENT, LATENT, 4)).astype(np.float32)
  negatives = [NEGATIVE, 'the line']
  both = run_ours(pipe, PROMPTS, latents, negative_prompt=negatives, num_videos_per_prompt=2,
                  output_type='float')
  assert both.shape == (4, 1, SIZE, SIZE, 3)
  for i, (prompt, negative) in enumerate(zip(PROMPTS, negatives)):
    alone = run_ours(pipe, prompt, latents[2 * i:2 * i + 2], negative_prompt=negative,
                     num_videos_per_prompt=2, output_type='float')
    np.testing.assert_array_equal(both[2 * i:2 * i + 2], alone)
  assert np.abs(both[0] - both[2]).max() > 0.05  # The prompts differ.


def test_num_videos_per_prompt_reach_the_cascade(setup, monkeypatch):
  """The cascade's stages get the repeated prompts and negatives with the base's latents (the
  stages stubbed: only what the pipeline hands them is checked)."""
  pipe = setup.pipe
  seen = {}

  def run_stages(_, latents, prompts, negatives, **kwargs):
    seen.update(latents=latents, prompts=prompts, negatives=negatives)
    return dict(latents=latents)

  monkeypatch.setattr(cascade, 'run_stages', run_stages)
  monkeypatch.setattr(cascade, 'check_configs', lambda *args, **kwargs: None)
  monkeypatch.setattr(pipe, 'interpolator', types.SimpleNamespace(config=None))
  latents = np.random.default_rng(1).standard_normal((4, 1, LATENT, LATENT, 4)).astype(np.float32)
  out = run_ours(pipe, PROMPTS, latents, negative_prompt=[NEGATIVE, ''], num_videos_per_prompt=2,
                 output_type='latent')
  assert seen['prompts'] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
  assert seen['negatives'] == [NEGATIVE] * 2 + [''] * 2
  assert out.shape == latents.shape and out is seen['latents']


def test_prompt_embeds_round_trip(setup):
  """encode_prompt gives what the denoiser uses: the same frames, bit for bit, from embeddings."""
  pipe = setup.pipe
  embeds = pipe.encode_prompt(PROMPTS)
  assert embeds.shape == (2, 77, 32) and embeds.dtype == np.float32
  assert pipe.context_shape() == (77, 32)
  assert np.abs(embeds[0] - embeds[1]).max() > 0.01  # The prompts' encodings differ.
  expected = run_ours(pipe, PROMPTS, setup.latents1, negative_prompt=NEGATIVE, output_type='float')
  negative = pipe.encode_prompt(NEGATIVE)  # One for both prompts, as a single negative prompt.
  got = run_ours(pipe, None, setup.latents1, prompt_embeds=embeds, negative_prompt_embeds=negative,
                 output_type='float')
  np.testing.assert_array_equal(got, expected)
  # Embeddings with a text negative prompt (encoded by the pipeline).
  got = run_ours(pipe, None, setup.latents1, prompt_embeds=embeds, negative_prompt=NEGATIVE,
                 output_type='float')
  np.testing.assert_array_equal(got, expected)


@pytest.mark.slow  # Compiles its own program (about 6 s on 2 cores, never in the persistent cache:
# host callbacks keep it out); the loop's hook itself is in test_diffusion's fast tier.
def test_callback_on_step_end(setup):
  """Called on the host after each step with (index, total), in order; another callback reuses the
  compiled program; frames as without a callback; the callback's exception comes out of the call."""
  pipe = setup.pipe
  calls, others = [], []
  kwargs = dict(negative_prompt=NEGATIVE, output_type='float')
  with_callback = run_ours(pipe, PROMPTS, setup.latents1,
                           callback_on_step_end=lambda i, n: calls.append((i, n)), **kwargs)
  assert calls == [(i, STEPS) for i in range(STEPS)]
  traces, compiled = pipe.trace_count, len(pipe.compiled)
  run_ours(pipe, PROMPTS, setup.latents1, callback_on_step_end=lambda *a: others.append(a), **kwargs)
  assert others == calls
  assert (pipe.trace_count, len(pipe.compiled)) == (traces, compiled), 'recompiled'

  def fail(i, n):
    if i == 1:
      raise KeyboardInterrupt('stop')
    others.append(i)

  others.clear()
  with pytest.raises(KeyboardInterrupt, match='stop'):
    run_ours(pipe, PROMPTS, setup.latents1, callback_on_step_end=fail, **kwargs)
  assert others == [0]
  without = run_ours(pipe, PROMPTS, setup.latents1, **kwargs)
  np.testing.assert_allclose(with_callback, without, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The CLI.


@pytest.mark.slow
def test_cli_writes_mp4(tiny_converted_dir, tmp_path):
  out = tmp_path / 'out.mp4'
  cmd = [sys.executable, '-m', 'magicvideo_jax.sample', '--checkpoint', tiny_converted_dir,
         '--prompt', PROMPTS[0], '--prompt', PROMPTS[1], '--output', str(out), '--num_frames', '1',
         '--height', str(SIZE), '--width', str(SIZE), '--steps', str(STEPS), '--guidance_scale',
         str(GUIDANCE), '--negative_prompt', NEGATIVE, '--seed', '3']
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  print(result.stderr[-2000:])
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().splitlines()[-1] == str(out)
  for stage in ('loaded', 'compiled denoise', 'denoising step 4/4', 'decoded'):
    assert stage in result.stderr
  frames = video_io.read_video(str(out))
  assert frames.shape == (1, SIZE, 2 * SIZE, 3)  # Two prompts side by side, one frame.


@pytest.mark.slow
def test_cli_bad_input(tiny_converted_dir, tmp_path, capsys):
  cmd = [sys.executable, '-m', 'magicvideo_jax.sample', '--checkpoint', tiny_converted_dir,
         '--prompt', 'a', '--output', str(tmp_path / 'x.mp4'), '--num_frames', '99']
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and 'num_frames=99' in lines[0] and 'Traceback' not in result.stderr, lines
  # The same checks in-process (fast): missing folder, bad size, bad extension, unknown sampler.
  base = ['--prompt', 'a', '--output', str(tmp_path / 'x.mp4')]
  for argv, match in [
      (['--checkpoint', str(tmp_path / 'nope')], 'checkpoint folder not found'),
      (['--checkpoint', tiny_converted_dir, '--height', '30'], 'height=30'),
      (['--checkpoint', tiny_converted_dir, '--output', str(tmp_path / 'x.avi')], "'.avi'"),
  ]:
    assert sample.main(base + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
  with pytest.raises(SystemExit) as e:
    sample.main(base + ['--checkpoint', tiny_converted_dir, '--sampler', 'euler'])
  assert e.value.code == 2 and "invalid choice: 'euler'" in capsys.readouterr().err


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores.
def test_pipe_and_cli_sample_the_same_video(tiny_converted_dir, tmp_path, monkeypatch):
  """Settings left out mean the same in `pipe(prompt)` and the CLI: the checkpoint's defaults."""
  written = {}
  monkeypatch.setattr(video_io, 'write_video',
                      lambda path, frames, fps=8.0, **kw: written.update(frames=frames, fps=fps))
  assert sample.main(['--checkpoint', tiny_converted_dir, '--prompt', PROMPTS[0], '--output',
                      str(tmp_path / 'x.mp4'), '--seed', '5']) == 0
  pipe = MagicVideoPipeline.from_pretrained(tiny_converted_dir)
  video = pipe(PROMPTS[0], seed=5)
  req = request_lib.resolve(pipe.config, geometry=True)
  assert video.shape == (1, req.num_frames, req.height, req.width, 3)
  assert req.num_inference_steps == pipe.config.sampling.num_inference_steps
  np.testing.assert_array_equal(written['frames'], video[0])
  assert written['fps'] == pipe.config.data.fps
