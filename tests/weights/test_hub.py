"""Hub repository ids resolved from a local Hugging Face cache the test lays out (offline, nothing
downloaded): `MagicVideoPipeline.from_pretrained` / `load_config` and `convert --diffusers_dir`."""

import os
import shutil

import numpy as np
import pytest
from flax import traverse_util

huggingface_hub = pytest.importorskip('huggingface_hub')

from magicvideo_jax import convert as convert_cli  # pylint: disable=g-import-not-at-top
from magicvideo_jax.sampling import pipeline as pipeline_lib
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax.weights import hub

REPO = 'tiny-org/tiny-sd'
COMMIT = '0123456789abcdef0123456789abcdef01234567'


@pytest.fixture
def hub_cache(tiny_sd_dir, tmp_path, monkeypatch):
  """A cache holding REPO (a copy of `tiny_sd_dir`) as huggingface_hub lays one out."""
  cache = tmp_path / 'hf_cache'
  repo = cache / f'models--{REPO.replace("/", "--")}'
  shutil.copytree(tiny_sd_dir, repo / 'snapshots' / COMMIT)
  (repo / 'refs').mkdir()
  (repo / 'refs' / 'main').write_text(COMMIT)
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
  monkeypatch.chdir(tmp_path)  # No local folder named like the repository.
  return cache


def test_repo_id_rules(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert hub.is_repo_id('org/name') and hub.is_repo_id('stable-diffusion-v1-5/stable-diffusion-v1-5')
  for not_an_id in ('gs://bucket/model', 'org', '/abs/path', './org/name', 'a/b/c', '../x', 'org/..'):
    assert not hub.is_repo_id(not_an_id), not_an_id
    assert hub.resolve(not_an_id) == not_an_id
  (tmp_path / 'org' / 'name').mkdir(parents=True)  # An existing local path is never a repository.
  assert not hub.is_repo_id('org/name') and hub.resolve('org/name') == 'org/name'


def test_repo_id_resolves_from_cache(hub_cache, tiny_converted_dir, tmp_path):
  snapshot = hub_cache / f'models--{REPO.replace("/", "--")}' / 'snapshots' / COMMIT
  assert os.path.samefile(hub.resolve(REPO), snapshot)
  assert pipeline_lib.checkpoint_kind(REPO) == ('diffusers', hub.resolve(REPO))
  config = pipeline_lib.load_config(REPO, num_frames=4)
  assert config.model.unet.block_out_channels == (32, 64)

  out = str(tmp_path / 'converted')  # The CLI by repository id = the CLI by folder.
  convert_cli.main(['--diffusers_dir', REPO, '--output', out, '--num_frames', '4'])
  got = traverse_util.flatten_dict(ckpt_lib.load_pretrained(out)[1], sep='/')
  expected = traverse_util.flatten_dict(ckpt_lib.load_pretrained(tiny_converted_dir)[1], sep='/')
  assert sorted(got) == sorted(expected)
  differ = [k for k in got if not np.array_equal(got[k], expected[k])]
  assert not differ, differ[:5]


def test_missing_repo_names_the_download_command(hub_cache, tmp_path):
  missing = 'tiny-org/not-downloaded'
  with pytest.raises(FileNotFoundError, match=rf"hf download {missing} --include '\*.safetensors'"):
    pipeline_lib.MagicVideoPipeline.from_pretrained(missing)
  with pytest.raises(SystemExit, match=rf'error: {missing} is neither a local folder.*hf download'):
    convert_cli.main(['--diffusers_dir', missing, '--output', str(tmp_path / 'out')])


def test_sample_cli_takes_a_repo_id(hub_cache, tmp_path):
  """`sample --checkpoint org/name` (the request checked against the cached folder's config)."""
  from magicvideo_jax import sample as sample_cli  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'out.gif'
  status = sample_cli.main(['--checkpoint', REPO, '--prompt', 'a red circle', '--num_frames', '1',
                            '--height', '32', '--width', '32', '--steps', '2', '--output', str(out)])
  assert status == 0 and out.is_file()
  assert sample_cli.main(['--checkpoint', 'tiny-org/not-downloaded', '--prompt', 'a red circle',
                          '--output', str(tmp_path / 'x.gif')]) != 0
