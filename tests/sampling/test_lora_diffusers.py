"""LoRA round trip with diffusers: adapters written by `weights/lora_io.py`, loaded by diffusers'
`StableDiffusionPipeline.load_lora_weights` (PEFT) and by `MagicVideoPipeline.load_lora_weights`,
give the same images from the same latents (DDIM, classifier-free guidance)."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
pytest.importorskip('peft')

from magicvideo_jax import MagicVideoPipeline
from magicvideo_jax import lora as lora_lib
from magicvideo_jax.weights import lora_io

SIZE, LATENT, STEPS, GUIDANCE = 32, 16, 4, 7.5
TOLERANCE = 2e-3  # Max |ours - diffusers| on [0, 1] images, as tests/sampling/test_pipeline.py.
TARGETS = (r'^unet/.*/attn[12]/to_(q|k|v|out_0)/kernel$', r'^unet/.*resnets_0/conv1/kernel$',
           r'^unet/.*transformer_blocks_0/temporal_attn/to_q/kernel$',
           r'^text_encoder/.*self_attn/(q|k|v|out)_proj/kernel$')


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores (a sampler compile, diffusers runs).
def test_diffusers_loads_our_lora_and_we_load_it_back(tiny_sd_dir, tmp_path):
  torch.set_num_threads(1)
  pipe = MagicVideoPipeline.from_pretrained(tiny_sd_dir, num_frames=4)
  config = pipe.config.copy_and_resolve_references()
  config.lora.update(rank=4, alpha=8.0, targets=TARGETS)
  rng = np.random.default_rng(0)
  fresh = lora_lib.init(pipe.params, config, jax.random.key(1))
  # Trained-looking adapters: lora_B random too, so the images change.
  lora = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape) / np.sqrt(x.shape[-2])
                                 ).astype(np.float32), fresh)
  written = lora_io.save(str(tmp_path / 'lora'), lora, alpha=8.0, rank=4)
  assert set(written) == {lora_io.IMAGE_FILE, lora_io.VIDEO_FILE}  # temporal_attn: its own file.

  latents = rng.standard_normal((1, 1, LATENT, LATENT, 4)).astype(np.float32)
  prompt = 'a red circle'
  reference = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
  reference.set_progress_bar_config(disable=True)

  def run_reference():
    with torch.no_grad():
      return reference(prompt, latents=torch.from_numpy(latents[:, 0].transpose(0, 3, 1, 2).copy()),
                       num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type='np',
                       guidance_scale=GUIDANCE).images

  def run_ours():
    return pipe(prompt, latents=latents, num_frames=1, height=SIZE, width=SIZE,
                num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type='float')[:, 0]

  plain = run_reference()
  reference.load_lora_weights(str(tmp_path / 'lora'))
  expected = run_reference()
  pipe.load_lora_weights(str(tmp_path / 'lora'))
  ours = run_ours()
  change = float(np.abs(expected - plain).max())
  err = float(np.abs(ours - expected).max())
  print(f'LoRA (rank 4, alpha 8; U-Net attention + conv, text encoder): diffusers+PEFT vs ours '
        f'max abs err {err:.2e}; the LoRA changes the image by up to {change:.3f}')
  assert change > 0.05  # The adapters matter, so the comparison can fail.
  assert err <= TOLERANCE

  # Scale 0 and unloading give the base model back; scale 0.5 is diffusers' lora scale 0.5.
  pipe.set_lora_scale(0.0)
  assert float(np.abs(run_ours() - plain).max()) <= TOLERANCE
  pipe.set_lora_scale(0.5)
  with torch.no_grad():
    half = reference(prompt, latents=torch.from_numpy(latents[:, 0].transpose(0, 3, 1, 2).copy()),
                     num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type='np',
                     guidance_scale=GUIDANCE, cross_attention_kwargs={'scale': 0.5}).images
  err_half = float(np.abs(run_ours() - half).max())
  print(f'lora scale 0.5: max abs err {err_half:.2e}')
  assert err_half <= TOLERANCE
  pipe.unload_lora_weights()
  assert float(np.abs(run_ours() - plain).max()) <= TOLERANCE
  assert pipe.trace_count == 1  # Adapters are parameters: nothing recompiled.
