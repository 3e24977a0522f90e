"""Tokenizers: CLIP's BPE (from a local folder) and a word-level one built from a dataset's captions.

Both turn a list of prompts into `[B, max_length]` int32 ids padded to `max_length`, with begin/end
tokens, and warn once when a prompt is truncated.
"""

import json
import os
import re
from typing import Dict, Iterable, List, Sequence
import warnings

from etils import epath
import numpy as np

WORDS_FILE = 'words_tokenizer.json'
WORD_PATTERN = r"[a-z0-9']+"  # A word of a (lower-cased) prompt.
SHOWN_CHARS = 80  # Prompts in warnings are cut to this many characters.


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
  """A prompt as a warning shows it: quoted, cut with its length when long."""
  return repr(text) if len(text) <= limit else f'{text[:limit]!r}... ({len(text)} characters)'


class WordTokenizer:
  """Lower-cased word-level tokenizer: `<pad>`, `<bos>`, `<eos>`, `<unk>`, then the vocabulary."""

  SPECIALS = ('<pad>', '<bos>', '<eos>', '<unk>')

  def __init__(self, words: Sequence[str], max_length: int = 16):
    self.vocab: Dict[str, int] = {w: i for i, w in enumerate(self.SPECIALS)}
    for word in words:
      self.vocab.setdefault(word, len(self.vocab))
    self.max_length = max_length
    self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(4)

  @classmethod
  def from_texts(cls, texts: Iterable[str], max_length: int = 16) -> 'WordTokenizer':
    words = sorted({w for t in texts for w in cls.split(t)})
    return cls(words, max_length)

  @staticmethod
  def split(text: str) -> List[str]:
    return re.findall(WORD_PATTERN, text.lower())

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    ids = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      words = self.split(text)
      tokens = [self.vocab.get(w, self.unk_id) for w in words]
      unknown = sorted({w for w in words if w not in self.vocab})
      if unknown:
        shown = ', '.join(repr(w) for w in unknown[:5]) + (', ...' if len(unknown) > 5 else '')
        warnings.warn(f'{len(unknown)} of the prompt\'s {len(words)} words are not in the model\'s '
                      f'vocabulary ({shown}) and read as <unk>: {shorten(text)}', stacklevel=2)
      if len(tokens) > self.max_length - 2:
        warnings.warn(f'prompt has {len(tokens)} words; truncated to {self.max_length - 2}: '
                      f'{shorten(text)}', stacklevel=2)
        tokens = tokens[:self.max_length - 2]
      seq = [self.bos_id] + tokens + [self.eos_id]
      ids[row, :len(seq)] = seq
    return ids

  def save(self, folder: str) -> None:
    folder = epath.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = [w for w in self.vocab if w not in self.SPECIALS]
    (folder / WORDS_FILE).write_text(json.dumps({'words': words, 'max_length': self.max_length},
                                                indent=1))

  def to_transformers(self):
    """The same tokenizer as a `transformers.PreTrainedTokenizerFast` (a word-level `tokenizers`
    model: lower-cased, the words of `split`, `<bos> ... <eos>`), for diffusers pipelines."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top
    from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
    backend = Tokenizer(models.WordLevel(vocab=dict(self.vocab), unk_token='<unk>'))
    backend.normalizer = normalizers.Lowercase()
    # The pattern's matches are the words; everything between them is dropped, as in `split`.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_PATTERN), behavior='removed', invert=True)
    backend.post_processor = processors.TemplateProcessing(
        single='<bos> $A <eos>', pair='<bos> $A <eos> $B <eos>',
        special_tokens=[('<bos>', self.bos_id), ('<eos>', self.eos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token='<bos>', eos_token='<eos>',
                                   pad_token='<pad>', unk_token='<unk>',
                                   model_max_length=self.max_length)

  def save_transformers(self, folder: str) -> None:
    """Writes `tokenizer.json` + `tokenizer_config.json` beside `words_tokenizer.json`:
    `AutoTokenizer.from_pretrained(folder)` loads it as a `PreTrainedTokenizerFast`."""
    self.save(folder)
    self.to_transformers().save_pretrained(os.fspath(folder))
    # transformers 5 names the class TokenizersBackend; the older name loads in 4.x and 5.x alike.
    config_path = epath.Path(folder) / 'tokenizer_config.json'
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config['tokenizer_class'] = 'PreTrainedTokenizerFast'
    config_path.write_text(json.dumps(tokenizer_config, indent=1))

  @classmethod
  def load(cls, folder: str) -> 'WordTokenizer':
    spec = json.loads((epath.Path(folder) / WORDS_FILE).read_text())
    return cls(spec['words'], spec['max_length'])


class CLIPTokenizer:
  """`transformers.CLIPTokenizer` from a local folder (vocab.json + merges.txt, or tokenizer.json),
  padded to `max_length` (77). Prompts longer than that are truncated with a `UserWarning`."""

  def __init__(self, folder: str, max_length: int = 77):
    from transformers import CLIPTokenizer as HFCLIPTokenizer  # pylint: disable=g-import-not-at-top
    self.tokenizer = HFCLIPTokenizer.from_pretrained(folder)
    self.max_length = max_length
    self.folder = folder

  @property
  def vocab_size(self) -> int:
    return len(self.tokenizer)

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    full = self.tokenizer(list(texts), padding=False, truncation=False)['input_ids']
    for text, ids in zip(texts, full):
      if len(ids) > self.max_length:
        warnings.warn(f'prompt has {len(ids)} tokens; truncated to {self.max_length} (the text '
                      f'encoder\'s maximum): {shorten(text)}', stacklevel=2)
    out = self.tokenizer(list(texts), padding='max_length', truncation=True,
                         max_length=self.max_length, return_tensors='np')['input_ids']
    return out.astype(np.int32)

  def save(self, folder: str) -> None:
    self.tokenizer.save_pretrained(folder)


def load_tokenizer(folder: str, max_length: int = 77):
  """The tokenizer stored in a checkpoint or diffusers `tokenizer/` folder."""
  if os.path.exists(os.path.join(folder, WORDS_FILE)):
    return WordTokenizer.load(folder)
  if any(os.path.exists(os.path.join(folder, f)) for f in ('vocab.json', 'tokenizer.json')):
    return CLIPTokenizer(folder, max_length)
  raise FileNotFoundError(
      f'no tokenizer in {folder}: expected {WORDS_FILE}, tokenizer.json or vocab.json + merges.txt')
