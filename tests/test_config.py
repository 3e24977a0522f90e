"""One defaults mechanism: `magicvideo_jax.config`'s section defaults and `fill_defaults`.

Every config file (and every variant its docstring or the README names) has every default key, so
that every `--config.a.b=v` override of a default works; a filled config keeps what was set and
gains what was missing; an old checkpoint's config.json loads with the keys added since; the
documented `image_noise` command trains.
"""

import glob
import importlib
import json
import os
import re
import shutil
import sys

from absl import flags
import flax.linen as nn
import jax
import ml_collections
import pytest

from configs import cmd_shapes
from configs import shapes
from configs import shapes_cascade
from configs import shapes_unsupervised
from magicvideo_jax import config as config_lib
from magicvideo_jax import context as context_lib
from magicvideo_jax import main as main_lib
from magicvideo_jax.models import clip as clip_lib
from magicvideo_jax.sampling import interpolation
from magicvideo_jax.sampling import upscaler
from magicvideo_jax.weights import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, 'magicvideo_jax', 'assets', 'shapes')

VARIANTS = dict(
    tiny=('video', 'image', 'all', 'vae', 'i2v', 'cmd_ae', 'cmd_content', 'cmd_motion'),
    sd15_256=('video', 'all', 'lavie', 'animatediff'),
    vdm_64=('',),
    cmd=('sd21_512x1024', 'sd15_512'),
    vdm_256=('same', 'absolute'),
    shapes=shapes.STAGES + tuple(f'{s},quick' for s in shapes.QUICK_STAGES),
    shapes_cascade=shapes_cascade.STAGES,
    shapes_unsupervised=shapes_unsupervised.VARIANTS + tuple(
        f'{v},tiny' for v in shapes_unsupervised.VARIANTS),
    shapes_lora=('',),
    shapes_i2v=('',),
    cmd_shapes=cmd_shapes.STAGES,
)
ALL = [(name, arg) for name, args in VARIANTS.items() for arg in args]


def _paths(tree, prefix=''):
  """Dotted paths of the leaves of a ConfigDict / dict."""
  out = set()
  for key, value in (tree.items() if tree is not None else ()):
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out |= _paths(value, f'{prefix}{key}.')
    else:
      out.add(prefix + key)
  return out


def _default_paths(config):
  """Every key `fill_defaults` owes `config`: base_config's, and the optional sections' it has."""
  want = {p for p in _paths(config_lib.base_config())
          if not any(p == o or p.startswith(o + '.') for o in config_lib.OPTIONAL)}
  for dotted, defaults in config_lib.OPTIONAL.items():
    section = config
    for name in dotted.split('.'):
      section = section.get(name) if isinstance(section, ml_collections.ConfigDict) else None
    if isinstance(section, ml_collections.ConfigDict):
      want |= {f'{dotted}.{p}' for p in _paths(defaults())}
  return want


def _get_config(name, arg):
  return importlib.import_module(f'configs.{name}').get_config(arg)


def test_every_config_file_and_named_variant_is_listed():
  files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))}
  assert files - {'__init__'} == set(VARIANTS)
  docs = [os.path.join(ROOT, 'README.md')] + glob.glob(os.path.join(ROOT, 'configs', '*.py'))
  named = set()
  for path in docs:
    for name, arg in re.findall(r'configs/(\w+)\.py:([a-z0-9_,]+)', open(path).read()):
      named.add((name, ','.join(o for o in arg.split(',') if o != 'base')))  # base=DIR: a folder.
  assert len(named) > 5  # The regex finds them.
  assert named <= set(ALL), named - set(ALL)


@pytest.mark.parametrize('name,arg', ALL)
def test_config_files_have_every_default_key(name, arg):
  config = _get_config(name, arg)
  assert _default_paths(config) - _paths(config) == set()  # Every default can be overridden.
  filled = config_lib.fill_defaults(config)
  assert filled.to_dict() == config.to_dict()


def test_fill_is_idempotent_and_never_overrides():
  config = shapes_unsupervised.get_config('stage1,tiny')
  config.interpolation = ml_collections.ConfigDict(dict(factor=5))
  config.model.clip = ml_collections.ConfigDict(dict(projection_dim=8))
  with config.unlocked():
    del config.model.conditioning['image_noise']
    del config.sampling['final_sigmas_type']
    del config['mesh']
    config.model.unet.fps_embedding = False  # Set, against the default True.
    config.model.user_key = 'kept'
  config.lock()
  filled = config_lib.fill_defaults(config)
  assert 'image_noise' not in config.model.conditioning  # A copy: the argument is unchanged.
  assert _default_paths(filled) - _paths(filled) == set()
  assert 'model.clip.logit_scale_init_value' in _default_paths(filled)
  assert filled.model.conditioning.image_noise == 0.0 and filled.sampling.final_sigmas_type == 'zero'
  assert filled.mesh.to_dict() == config_lib.base_config().mesh.to_dict()
  assert filled.model.clip.logit_scale_init_value == clip_lib.LOGIT_SCALE_INIT
  assert filled.interpolation.to_dict() == dict(config_lib.interpolation_defaults(), factor=5)
  assert 'upscaler' not in filled  # Optional: filled only where present.
  for path in _paths(config):
    value = filled
    original = config
    for name in path.split('.'):
      value, original = value[name], original[name]
    assert value == original, path
  assert filled.is_locked
  filled.train.init_from = '/a/folder'  # A placeholder keeps its type: str.
  with pytest.raises(TypeError):
    filled.train.init_from = 3
  assert config_lib.fill_defaults(filled).to_dict() == filled.to_dict()


def test_section_builders_agree_with_config():
  # The defaults live in config.py (below weights/checkpoint); sampling/ still has its builders.
  assert interpolation.default_config().to_dict() == config_lib.interpolation_defaults().to_dict()
  assert upscaler.default_config().to_dict() == config_lib.upscaler_defaults().to_dict()


def test_old_checkpoint_config_gains_the_new_keys(tmp_path):
  with open(os.path.join(BUNDLED, ckpt_lib.CONFIG_FILE)) as f:
    stored = json.load(f)
  assert 'image_noise' not in stored['model']['conditioning']  # Written before image_noise.
  old = json.loads(json.dumps(stored))
  del old['model']['conditioning']['num_tokens']
  del old['diffusion']['frame_noise_correlation']
  del old['sampling']['sigma_spacing']
  folder = tmp_path / 'old'
  folder.mkdir()
  (folder / ckpt_lib.CONFIG_FILE).write_text(json.dumps(old))
  loaded = ckpt_lib.load_config(str(folder))
  assert _default_paths(loaded) - _paths(loaded) == set()
  assert loaded.model.conditioning.image_noise == 0.0 and loaded.model.conditioning.num_tokens == 4
  assert loaded.diffusion.frame_noise_correlation == 0.0
  assert loaded.sampling.sigma_spacing == 'lu_lambdas'
  # What the bundled folder stores is what it loads with.
  bundled = ckpt_lib.load_config(BUNDLED)
  expected = ckpt_lib.config_from_json(json.dumps(stored))
  for path in _paths(stored):
    value, want = bundled, expected
    for name in path.split('.'):
      value, want = value[name], want[name]
    assert value == want, path


def test_resolve_derived_returns_a_copy():
  config = shapes_unsupervised.get_config('text_tokens,tiny')
  config.train.init_from = BUNDLED
  config.model.vae.scaling_factor = 0.5
  resolved = context_lib.resolve_derived(config)
  assert resolved.model.vae.scaling_factor == ckpt_lib.load_config(BUNDLED).model.vae.scaling_factor
  assert resolved.model.vae.scaling_factor != 0.5
  assert config.model.vae.scaling_factor == 0.5


@pytest.fixture()
def dual_encoder_folder(tmp_path):
  """An export holding a random tiny dual encoder (`params['clip']`, `config.model.clip`)."""
  config = config_lib.fill_defaults(ml_collections.ConfigDict(dict(
      model=dict(clip=shapes_unsupervised.dual_encoder('tiny')))))
  model = clip_lib.build_clip(config.model)
  params = nn.unbox(model.init(jax.random.key(0), *clip_lib.dummy_inputs(config.model.clip))['params'])
  folder = str(tmp_path / 'clip')
  ckpt_lib.save_pretrained(folder, config, {'clip': params})
  return folder


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores.
def test_documented_image_noise_override_trains(tmp_path, monkeypatch, shapes_data_dir,
                                                 dual_encoder_folder):
  workdir = str(tmp_path / 'run')
  argv = ['main', f'--config={ROOT}/configs/shapes_unsupervised.py:stage1,tiny',
          f'--workdir={workdir}', '--config.model.conditioning.image_noise=0.78',
          f'--config.model.conditioning.clip_dir={dual_encoder_folder}',
          f'--config.data.data_dir={shapes_data_dir}', '--config.data.prefetch=0',
          '--config.train.num_steps=1', '--config.train.log_every=1']
  monkeypatch.setattr(sys, 'argv', argv)  # config_flags reads the overrides from sys.argv.
  try:
    flags.FLAGS(argv)
    main_lib.main(['main'])
  finally:
    flags.FLAGS.unparse_flags()
  exported = ckpt_lib.load_config(os.path.join(workdir, 'model'))
  assert exported.model.conditioning.image_noise == 0.78
  assert exported.model.clip.projection_dim == shapes_unsupervised.dual_encoder('tiny').projection_dim
  shutil.rmtree(workdir)


def test_cmd_recipe_reads_encoded_latents_unless_told_otherwise():
  for stage in cmd_shapes.STAGES:
    data = cmd_shapes.get_config(stage).data
    assert (data.dataset, data.precomputed_latents) == ('encoded_latents/shapes_bundle', True)
    data = cmd_shapes.get_config(f'{stage},latents=mine').data
    assert data.dataset == 'encoded_latents/mine'
    data = cmd_shapes.get_config(f'{stage},latents=none').data
    assert (data.dataset, data.precomputed_latents) == ('moving_shapes', False)
  with pytest.raises(ValueError, match='latents=NAME'):
    cmd_shapes.get_config('motion,latent=x')
