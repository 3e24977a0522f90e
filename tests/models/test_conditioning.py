"""Conditioning on CLIP embeddings (MagicVideo's unsupervised pre-training), context.py, models/clip.py.

Parity of the text tower with projection and of the dual encoder with transformers (relative error
max|ours - ref| / max|ref|, printed with -s: CLIPTextModelWithProjection text_embeds 6.3e-7 and
last_hidden_state 4.7e-7 with first-EOS and with legacy largest-id pooling; CLIPModel text / image
embeds 2.9e-7 / 1.5e-7, logits_per_image 5.0e-7); a stage-1 context depends on the chosen frame
alone; the pipeline's unconditional context is the zero embedding's; caption_fraction; the
contrastive loss; stage 1, its resume and stage 2 through `magicvideo_jax.main`, then sampling the
stage-2 export.
"""

import copy
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from configs import shapes_unsupervised  # pylint: disable=g-import-not-at-top
from magicvideo_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
from magicvideo_jax import context as context_lib  # pylint: disable=g-import-not-at-top
from magicvideo_jax.weights import torch_layout
from magicvideo_jax import models as models_lib  # pylint: disable=g-import-not-at-top
from magicvideo_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
from magicvideo_jax.training import train  # pylint: disable=g-import-not-at-top
from magicvideo_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
from magicvideo_jax.models import conditioning  # pylint: disable=g-import-not-at-top
from magicvideo_jax.models import text_encoder  # pylint: disable=g-import-not-at-top
from magicvideo_jax.weights import clip as clip_weights
from magicvideo_jax import losses

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=20, projection_dim=16)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              image_size=16, patch_size=4)


def _rel_err(ours, ref):
  return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def _perturb(model):
  torch.manual_seed(1)
  with torch.no_grad():  # LayerNorm affines and all: a swap of any two leaves shows.
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _ids_with_eos(eos, length=12, batch=3, vocab=TEXT['vocab_size']):
  """Random ids below `eos` with an EOS (then padding with EOS) at a different place per row."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, min(eos, vocab), size=(batch, length))
  for row, end in enumerate((4, 9, length - 1)[:batch]):
    ids[row, end:] = eos
  return ids


# ----------------------------------------------------------------------------------------------------
# Parity.


@pytest.mark.parametrize('eos_token_id', [99, 2])
def test_text_projection_matches_transformers(eos_token_id, tmp_path):
  """`CLIPTextModelWithProjection` loaded from a transformers folder; eos 2 is the legacy rule
  (pool the largest id), which our config spells eos_token_id=None."""
  torch.manual_seed(0)
  config = transformers.CLIPTextConfig(**TEXT, bos_token_id=0, eos_token_id=eos_token_id,
                                       pad_token_id=1)
  reference = _perturb(transformers.CLIPTextModelWithProjection(config))
  reference.save_pretrained(str(tmp_path))
  ours_config, params = clip_weights.load_clip_text(str(tmp_path))
  assert ours_config['eos_token_id'] == (None if eos_token_id == 2 else eos_token_id)
  ids = _ids_with_eos(99)
  with torch.no_grad():
    expected = reference(torch.from_numpy(ids))
  model = text_encoder.CLIPTextModelWithProjection(**ours_config)
  got = jax.jit(model.apply)({'params': params}, jnp.asarray(ids, jnp.int32))
  err_e = _rel_err(got.text_embeds, expected.text_embeds.numpy())
  err_h = _rel_err(got.last_hidden_state, expected.last_hidden_state.numpy())
  print(f'CLIPTextModelWithProjection eos={eos_token_id}: text_embeds max rel err {err_e:.2e}, '
        f'last_hidden_state {err_h:.2e}')
  assert got.text_embeds.shape == (3, TEXT['projection_dim'])
  assert err_e <= 1e-5 and err_h <= 1e-5


def test_eos_positions():
  ids = jnp.asarray([[1, 2, 0, 0], [1, 7, 5, 2], [1, 9, 2, 2]])
  np.testing.assert_array_equal(text_encoder.eos_positions(ids, 2), [1, 3, 2])
  np.testing.assert_array_equal(text_encoder.eos_positions(ids, None), [1, 1, 1])


def test_bare_text_model_is_refused(tmp_path):
  config = transformers.CLIPTextConfig(**{k: v for k, v in TEXT.items() if k != 'projection_dim'})
  transformers.CLIPTextModel(config).save_pretrained(str(tmp_path))
  with pytest.raises(torch_layout.ConversionError, match='text_projection'):
    clip_weights.load_clip_text(str(tmp_path))


@pytest.fixture(scope='module')
def clip_folder(tmp_path_factory):
  """A random tiny transformers `CLIPModel` (16x16 images, vocabulary of the tiny word tokenizer)
  saved with save_pretrained: the frozen dual encoder of the stage runs."""
  torch.set_num_threads(1)
  torch.manual_seed(0)
  text = dict(TEXT, vocab_size=64, max_position_embeddings=16, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
  text.pop('projection_dim')
  model = _perturb(transformers.CLIPModel(transformers.CLIPConfig(
      text_config=text, vision_config=VISION, projection_dim=16)))
  folder = str(tmp_path_factory.mktemp('clip') / 'clip')
  model.save_pretrained(folder)
  return folder, model


def test_dual_encoder_matches_transformers(clip_folder):
  folder, reference = clip_folder
  clip_config, params = clip_weights.load_dual_encoder(folder)
  assert clip_config['text']['eos_token_id'] is None  # 2: the legacy largest-id pooling.
  assert set(params) == {'text_model', 'vision_model', 'text_projection', 'visual_projection',
                         'logit_scale'}
  ids = _ids_with_eos(63, length=16)
  pixels = np.random.default_rng(1).standard_normal((3, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    expected = reference(input_ids=torch.from_numpy(ids),
                         pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
  model = models_lib.build_models(_model_config(clip_config))['clip']
  got = jax.jit(model.apply)({'params': params}, jnp.asarray(ids, jnp.int32), jnp.asarray(pixels))
  # CLIPModel's forward returns normalised embeddings.
  text = np.asarray(conditioning.normalize_embedding(got.text_embeds))
  image = np.asarray(conditioning.normalize_embedding(got.image_embeds))
  logits = np.exp(float(got.logit_scale)) * image @ text.T
  errs = dict(text_embeds=_rel_err(text, expected.text_embeds.numpy()),
              image_embeds=_rel_err(image, expected.image_embeds.numpy()),
              logits_per_image=_rel_err(logits, expected.logits_per_image.numpy()))
  print('CLIPModel max rel err: ' + ', '.join(f'{k} {v:.2e}' for k, v in errs.items()))
  assert max(errs.values()) <= 1e-5
  # The text tower alone, from the same folder, as the converter reads it.
  text_config, text_params = clip_weights.load_clip_text(folder)
  alone = text_encoder.CLIPTextModelWithProjection(**text_config).apply(
      {'params': text_params}, jnp.asarray(ids, jnp.int32))
  np.testing.assert_allclose(alone.text_embeds, got.text_embeds, rtol=1e-5, atol=1e-5)


def test_embedding_to_context_is_video_only():
  assert torch_layout.is_video_only('unet/embedding_to_context/proj/kernel')
  assert not torch_layout.is_video_only('unet/conv_in/kernel')


# ----------------------------------------------------------------------------------------------------
# Contexts.


def _model_config(clip_config, variant='stage1,tiny', **conditioning_overrides):
  config = shapes_unsupervised.get_config(variant)
  config.model.conditioning.update(clip_dir='', **conditioning_overrides)
  config.model.clip = ml_collections.ConfigDict(clip_config)
  return config.model


@pytest.fixture(scope='module')
def stage1_setup():
  """A stage-1 tiny config with a random dual encoder, its modules and params."""
  config = shapes_unsupervised.get_config('stage1,tiny')
  config.model.conditioning.update(clip_dir='', image_dropout=0.5)
  config.model.clip = shapes_unsupervised.dual_encoder('tiny')
  context_lib.prepare_config(config)
  modules = models_lib.build_models(config.model)
  params = jax.jit(lambda k: nn.unbox(state_lib.init_params(modules, config, k)))(jax.random.key(0))
  return config, modules, params


def test_stage1_context_depends_only_on_the_chosen_frame(stage1_setup):
  config, modules, params = stage1_setup
  b, f, r = 8, config.data.num_frames, config.data.resolution
  video = jax.random.uniform(jax.random.key(1), (b, f, r, r, 3), minval=-1.0, maxval=1.0)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(2), i))(jnp.arange(b))
  batch = dict(video=video, input_ids=jnp.zeros((b, 16), jnp.int32))
  context_fn = jax.jit(lambda p, x: context_lib.training_context(p, x, keys, modules=modules,
                                                                 config=config))
  context = np.asarray(context_fn(params, batch))
  chosen = np.asarray(context_lib.frame_indices(keys, f))
  assert context.shape == (b, config.model.conditioning.num_tokens,
                           config.model.unet.cross_attention_dim)
  assert len(set(chosen.tolist())) > 1  # The keys pick different frames.
  # Any change to the other frames leaves the context unchanged, bit for bit.
  chosen_mask = np.arange(f)[None, :] == chosen[:, None]  # [B, F]
  noise = jax.random.normal(jax.random.key(3), video.shape)
  others = jnp.where(chosen_mask[:, :, None, None, None], video, noise)
  np.testing.assert_array_equal(np.asarray(context_fn(params, dict(batch, video=others))), context)
  # It is the context of that frame's own embedding (or of the zero embedding where dropped).
  frames = video[jnp.arange(b), chosen]
  pixels = (frames + 1.0) / 2.0
  from magicvideo_jax.models import clip_vision  # pylint: disable=g-import-not-at-top
  embeds = modules['clip'].apply({'params': params['clip']}, None, clip_vision.preprocess(
      pixels, config.model.clip.vision.image_size)).image_embeds
  zero_context = np.asarray(context_lib.embeddings_to_context(
      config.model, params, embeds, jnp.zeros((b,), bool)))
  dropped = np.all(np.isclose(context, zero_context, atol=0), axis=(1, 2))
  kept_context = np.asarray(context_lib.embeddings_to_context(config.model, params, embeds,
                                                              jnp.ones((b,), bool)))
  print(f'stage-1 batch: frames {chosen.tolist()}, dropped {dropped.tolist()}')
  assert dropped.any() and not dropped.all()  # image_dropout=0.5: both kinds in this batch.
  np.testing.assert_allclose(context[~dropped], kept_context[~dropped], rtol=1e-5, atol=1e-6)
  # And changing the chosen frame of a kept clip changes its context.
  row = int(np.flatnonzero(~dropped)[0])
  moved = video.at[row, chosen[row]].set(-video[row, chosen[row]])
  changed = np.asarray(context_fn(params, dict(batch, video=moved)))
  assert np.max(np.abs(changed[row] - context[row])) > 1e-3
  np.testing.assert_array_equal(np.delete(changed, row, 0), np.delete(context, row, 0))


def test_perturb_embeddings_is_lafite_noise():
  """A random direction of norm xi on the normalised embedding: exactly xi away, cosine to the clean
  embedding about 1/sqrt(1 + xi^2) in 64 dimensions, a fresh direction per key."""
  b, d, xi = 512, 64, 0.78
  embeds = 3.0 * jax.random.normal(jax.random.key(4), (b, d))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.arange(b))
  clean = np.asarray(conditioning.normalize_embedding(embeds))
  got = np.asarray(context_lib.perturb_embeddings(embeds, keys, xi))
  np.testing.assert_allclose(np.linalg.norm(got - clean, axis=-1), xi, rtol=1e-5)
  cosine = np.sum(clean * got, axis=-1) / np.linalg.norm(got, axis=-1)
  print(f'xi={xi}: mean cosine {cosine.mean():.3f} (1/sqrt(1+xi^2)={1 / np.sqrt(1 + xi**2):.3f})')
  assert abs(cosine.mean() - 1 / np.sqrt(1 + xi**2)) < 0.02
  directions = got - clean
  assert np.max(np.abs(directions[0] - directions[1])) > 0.1  # Not one shared offset.
  np.testing.assert_array_equal(np.asarray(context_lib.perturb_embeddings(embeds, keys, 0.0)), clean)


def test_stage1_image_noise_changes_only_kept_contexts(stage1_setup):
  """image_noise moves every kept clip's context, leaves dropped clips at the zero embedding's
  context, and is a function of the step's keys (reproducible)."""
  config, modules, params = stage1_setup
  b, f, r = 8, config.data.num_frames, config.data.resolution
  video = jax.random.uniform(jax.random.key(1), (b, f, r, r, 3), minval=-1.0, maxval=1.0)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(2), i))(jnp.arange(b))
  noisy_config = copy.deepcopy(config)
  noisy_config.model.conditioning.image_noise = 0.78

  def context(c):
    return np.asarray(context_lib.image_context(c.model, modules, params, video, keys, f))

  clean, noisy = context(config), context(noisy_config)
  np.testing.assert_array_equal(context(noisy_config), noisy)
  zero = np.asarray(context_lib.embeddings_to_context(
      config.model, params, jnp.ones((b, config.model.clip.projection_dim)), jnp.zeros((b,), bool)))
  dropped = np.all(clean == zero, axis=(1, 2))
  assert dropped.any() and not dropped.all()
  np.testing.assert_array_equal(noisy[dropped], clean[dropped])
  assert np.min(np.max(np.abs(noisy[~dropped] - clean[~dropped]), axis=(1, 2))) > 1e-4
  bad = copy.deepcopy(config)
  bad.model.conditioning.image_noise = -0.1
  with pytest.raises(ValueError, match='image_noise'):
    context_lib.prepare_config(bad)


def test_text_context_empty_prompt_is_zero_embedding(stage1_setup):
  """Sampling and stage 2 go through the text path; "" (dropped caption, unconditional prompt)
  gives the zero embedding's context, any caption another one."""
  config, modules, params = stage1_setup
  tokenizer = train.build_tokenizer(config)
  ids = jnp.asarray(tokenizer(['', 'a red circle moving left', 'a blue star growing']))
  got = np.asarray(context_lib.text_context(config.model, modules, params, ids))
  zero = np.asarray(context_lib.embeddings_to_context(
      config.model, params, jnp.ones((3, config.model.clip.projection_dim)), jnp.zeros((3,), bool)))
  np.testing.assert_array_equal(got[0], zero[0])
  assert np.max(np.abs(got[1] - zero[1])) > 1e-3 and np.max(np.abs(got[1] - got[2])) > 1e-3


def test_contrastive_loss():
  """Aligned pairs: accuracy 1 and a low loss; equal captions are positives of each other; empty
  captions take no part."""
  rng = np.random.default_rng(0)
  embeds = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
  positives = jnp.eye(4, dtype=bool)
  valid = jnp.ones((4,), bool)
  scale = jnp.log(100.0)
  aligned, metrics = losses.contrastive_loss(embeds, embeds * 3.0, scale, positives, valid)
  shuffled, _ = losses.contrastive_loss(embeds, embeds[::-1], scale, positives, valid)
  assert float(metrics['i2t_accuracy']) == float(metrics['t2i_accuracy']) == 1.0
  assert float(aligned) < 0.1 < float(shuffled)
  # Rows 0 and 1 share a caption: text 1 matching image 0 is no error.
  duplicate = embeds.at[1].set(embeds[0])
  pos = positives.at[0, 1].set(True).at[1, 0].set(True)
  loss_pos, _ = losses.contrastive_loss(duplicate, duplicate, scale, pos, valid)
  loss_neg, _ = losses.contrastive_loss(duplicate, duplicate, scale, positives, valid)
  assert float(loss_pos) < 0.1 < float(loss_neg)
  # An invalid (empty-caption) pair changes nothing for the others.
  extra = jnp.concatenate([embeds, rng.standard_normal((1, 8)).astype(np.float32)])
  with_extra, _ = losses.contrastive_loss(extra, extra, scale, jnp.eye(5, dtype=bool),
                                            jnp.asarray([True] * 4 + [False]))
  np.testing.assert_allclose(float(with_extra), float(aligned), rtol=1e-6)


def test_clip_objective_learns_a_fixed_batch():
  """The 'clip' loss (registered in losses.LOSSES) trains the tiny dual encoder on one batch of
  frames and captions: loss down, accuracy up."""
  config = shapes_unsupervised.get_config('clip,tiny')
  modules = {'clip': clip_lib.build_clip(config.model)}
  params = {'clip': nn.unbox(modules['clip'].init(jax.random.key(0), *clip_lib.dummy_inputs(
      config.model.clip))['params'])}
  tokenizer = train.build_tokenizer(config)
  captions = ['a red circle moving left', 'a blue square moving up', 'a green star growing',
              'a white triangle moving down'] * 2
  colours = {'red': (1, -1, -1), 'blue': (-1, -1, 1), 'green': (-1, 1, -1), 'white': (1, 1, 1)}
  video = np.full((len(captions), 1, 16, 16, 3), -0.8, np.float32)  # A dark background.
  for i, caption in enumerate(captions):  # A coloured square, at a place of its own.
    video[i, :, 2 + i % 4 * 3:8 + i % 4 * 3, 5:11] = colours[caption.split()[1]]
  batch = dict(video=jnp.asarray(video), input_ids=jnp.asarray(tokenizer(captions)))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(1), i))(jnp.arange(len(captions)))
  loss_fn = lambda p: losses.LOSSES['clip'](p, batch, keys, modules=modules, schedule=None,
                                           config=config)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics

  history = []
  for _ in range(60):
    params, opt_state, loss, metrics = step(params, opt_state)
    history.append(float(loss))
  print(f'clip objective on a fixed batch: loss {history[0]:.3f} -> {history[-1]:.3f}, '
        f'i2t accuracy {float(metrics["i2t_accuracy"]):.2f}')
  assert history[-1] < 0.5 * history[0]
  assert float(metrics['i2t_accuracy']) == 1.0


# ----------------------------------------------------------------------------------------------------
# caption_fraction.


def test_caption_fraction_is_deterministic_and_exact():
  source = [dict(caption=f'clip {i}'.encode(), index=i) for i in range(1000)]
  a = input_pipeline.CaptionSubset(source, 0.1, seed=0)
  b = input_pipeline.CaptionSubset(source, 0.1, seed=0)
  other = input_pipeline.CaptionSubset(source, 0.1, seed=1)
  np.testing.assert_array_equal(a.captioned, b.captioned)
  assert len(a.captioned) == 100 and len(a) == 1000
  assert set(a.captioned.tolist()) != set(other.captioned.tolist())
  captioned = [i for i in range(1000) if a[i]['caption']]
  assert captioned == a.captioned.tolist()
  assert all(a[i]['caption'] == b'' for i in range(1000) if i not in set(captioned))
  only = input_pipeline.CaptionSubset(source, 0.1, seed=0, captioned_only=True)
  assert len(only) == 100 and [only[i]['index'] for i in range(100)] == captioned
  assert len(input_pipeline.captioned_indices(1000, 0.25, 3)) == 250


def test_caption_fraction_in_the_iterator(shapes_data_dir):
  config = shapes_unsupervised.get_config('text_only,tiny').data
  config.update(data_dir=shapes_data_dir, caption_dropout=0.0, prefetch=0)
  expected = input_pipeline.captioned_indices(256, 0.1, 0)  # moving_shapes/tiny: 256 clips.
  only = input_pipeline.create_iterator(config)
  assert only.num_examples == len(expected) == 26
  batch = next(only)
  assert all(batch['caption'])  # Every clip it reads has its caption.
  config.captioned_only = False
  mixed = input_pipeline.create_iterator(config)
  seen = {}
  for _ in range(mixed.steps_per_epoch):
    batch = next(mixed)
    seen.update(zip(batch['index'].tolist(), (bool(c) for c in batch['caption'])))
  assert sorted(i for i, has in seen.items() if has) == sorted(set(expected) & set(seen))
  print(f'{sum(seen.values())} of {len(seen)} clips read in an epoch are captioned')


# ----------------------------------------------------------------------------------------------------
# Stage 1, resume, stage 2 via `magicvideo_jax.main`; sampling the result.


def _main_cmd(workdir, variant, data_dir, *overrides):
  return [sys.executable, '-m', 'magicvideo_jax.main',
          f'--config=configs/shapes_unsupervised.py:{variant},tiny', f'--workdir={workdir}',
          '--num_cpu_devices=1', f'--config.data.data_dir={data_dir}', '--config.data.prefetch=0',
          '--config.train.log_every=1', *overrides]


def _env():
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)
  return env


def _main(*args):
  cmd = _main_cmd(*args)
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  if proc.returncode:
    raise AssertionError(f'{" ".join(cmd)} failed:\n{proc.stderr[-4000:]}')
  return proc.stderr


def _steps(workdir):
  root = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def _kill_after_first_checkpoint(cmd, workdir, timeout=600):
  """Runs `cmd` until a checkpoint is on disk, then kill -9 (the run's num_steps is unchanged, so
  the resumed run reuses the compiled step from the compilation cache)."""
  with open(os.path.join(workdir + '.log'), 'w') as log:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=log)
    t0 = time.time()
    while not _steps(workdir):
      if proc.poll() is not None:
        raise AssertionError(f'ended before a checkpoint:\n{open(workdir + ".log").read()[-3000:]}')
      if time.time() - t0 > timeout:
        proc.kill()
        raise AssertionError('no checkpoint in time')
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  return _steps(workdir)


@pytest.fixture(scope='module')
def stage_runs(tmp_path_factory, shapes_data_dir, clip_folder):
  """Stage 1 killed after its first checkpoint and resumed to the end, then stage 2 from stage 1's
  export: (stage1 workdir, stage2 workdir, {'killed_at', 'resume', 'stage2'} logs)."""
  root = tmp_path_factory.mktemp('stages')
  stage1, stage2 = str(root / 'stage1'), str(root / 'stage2')
  args = ('--config.train.checkpoint_every=2', '--config.train.num_steps=6')
  stage1_args = (stage1, 'stage1', shapes_data_dir, *args,
                 f'--config.model.conditioning.clip_dir={clip_folder[0]}')
  logs = dict(killed_at=_kill_after_first_checkpoint(_main_cmd(*stage1_args), stage1))
  with open(stage1 + '.log') as f:
    logs['stage1'] = f.read()
  logs['resume'] = _main(*stage1_args)
  # Stage 2 finds the frozen encoder (architecture and weights) in stage 1's export.
  logs['stage2'] = _main(stage2, 'stage2', shapes_data_dir, *args,
                         '--config.model.conditioning.clip_dir=',
                         f'--config.train.init_from={stage1}/model')
  return stage1, stage2, logs


@pytest.mark.slow
def test_stage1_runs_and_resumes(stage_runs):
  stage1, _, logs = stage_runs
  assert 'CLIP image embeddings' in logs['stage1'] and 'frozen dual encoder' in logs['stage1']
  print('stage 1 killed with checkpoints', logs['killed_at'], 'then resumed')
  assert 6 not in logs['killed_at']
  assert f'step {max(logs["killed_at"])}' in logs['resume'] and 'resuming from' in logs['resume']
  assert 'frozen dual encoder' not in logs['resume']  # It comes back with the checkpoint.
  assert _steps(stage1)[-1] == 6


@pytest.mark.slow
def test_stage2_starts_from_stage1_and_samples_from_text(stage_runs, clip_folder):
  stage1, stage2, logs = stage_runs
  assert 'CLIP text embeddings' in logs['stage2']
  assert _steps(stage2)[-1] == 6
  from magicvideo_jax.weights import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from magicvideo_jax.sampling.pipeline import MagicVideoPipeline  # pylint: disable=g-import-not-at-top
  params_1 = ckpt_lib.load_params(os.path.join(stage1, 'model'))
  config_2, params_2, _ = ckpt_lib.load_pretrained(os.path.join(stage2, 'model'))
  assert config_2.model.conditioning.source == 'text'
  _, reference = clip_weights.load_dual_encoder(clip_folder[0])  # The frozen encoder, untouched.
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(params_2['clip'])):
    np.testing.assert_array_equal(a, b)
  # The VAE came from stage 1 (frozen); the U-Net's new layer trained on from stage 1's.
  for a, b in zip(jax.tree.leaves(params_1['vae']), jax.tree.leaves(params_2['vae'])):
    np.testing.assert_array_equal(a, b)
  bridge_1 = params_1['unet'][conditioning.NAME]['proj']['kernel']
  bridge_2 = params_2['unet'][conditioning.NAME]['proj']['kernel']
  assert 0 < np.max(np.abs(bridge_1 - bridge_2)) < 0.1 * np.max(np.abs(bridge_1))
  pipe = MagicVideoPipeline.from_pretrained(os.path.join(stage2, 'model'))
  videos = pipe(['a red circle moving left', 'a blue square moving up'], num_frames=8, height=16,
                width=16, num_inference_steps=2, guidance_scale=3.0, seed=0)
  assert videos.shape == (2, 8, 16, 16, 3) and videos.dtype == np.uint8
