"""Hugging Face Hub repository ids (`org/name`) resolved through the local Hugging Face cache.

`MagicVideoPipeline.from_pretrained` and `python -m magicvideo_jax.convert --diffusers_dir` accept a
repository id where they accept a folder: `resolve` maps it to its snapshot folder in the cache
(`$HF_HUB_CACHE`, default `~/.cache/huggingface/hub`), never downloading (`local_files_only`), so
loading works offline and never fetches gigabytes unasked. A repository missing from the cache is a
FileNotFoundError naming the command that downloads it. An existing local path always wins over a
repository id, and a URL (`gs://...`) is never taken for one.
"""

import os
import re

# `owner/name`, each part letters, digits, '-', '_', '.' (the Hub's rule); no leading '.' or '/'.
_REPO_ID = re.compile(r'[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}')
# What the importer reads: safetensors weights, configs, tokenizer files.
DOWNLOAD_PATTERNS = ('*.safetensors', '*.json', '*.txt')


def is_repo_id(path: str) -> bool:
  """True for a string that names a Hub repository rather than a local path or a URL."""
  text = os.fspath(path)
  return ('://' not in text and _REPO_ID.fullmatch(text) is not None and '..' not in text
          and not os.path.exists(text))


def download_command(repo_id: str) -> str:
  patterns = ' '.join(f"'{p}'" for p in DOWNLOAD_PATTERNS)
  return f'hf download {repo_id} --include {patterns}'


def resolve(path: str) -> str:
  """`path` itself, or for a Hub repository id its snapshot folder in the local cache.

  Raises:
    FileNotFoundError: a repository id that is not in the cache (the message names the command that
      downloads it).
  """
  if not is_repo_id(path):
    return path
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  try:
    return huggingface_hub.snapshot_download(os.fspath(path), local_files_only=True)
  except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, errors.CacheNotFound,
          errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
    cache = huggingface_hub.constants.HF_HUB_CACHE
    raise FileNotFoundError(
        f'{path} is neither a local folder nor a Hugging Face Hub repository in the local cache '
        f'({cache}); download it first with: {download_command(path)}') from e
