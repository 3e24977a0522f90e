"""Tokenizer warnings a person can read: long prompts cut, unknown words counted."""

import warnings

import pytest

from magicvideo_jax import tokenizer as tok_lib


def test_a_long_prompt_is_shown_cut_in_the_warning():
  tok = tok_lib.WordTokenizer(['a', 'red', 'circle'], max_length=8)
  prompt = ' '.join(['red'] * 2000)
  with pytest.warns(UserWarning, match='truncated to 6') as record:
    ids = tok([prompt])
  assert ids.shape == (1, 8)
  message = str(record[0].message)
  assert len(message) < 200 and '(7999 characters)' in message


def test_unknown_words_are_reported_with_a_count():
  tok = tok_lib.WordTokenizer(['a', 'red', 'circle'])
  with pytest.warns(UserWarning, match=r"2 of the prompt's 4 words are not in the model's vocabulary "
                                       r"\('blue', 'square'\)"):
    ids = tok(['a blue square circle'])
  assert list(ids[0, 1:5]) == [tok.vocab['a'], tok.unk_id, tok.unk_id, tok.vocab['circle']]
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # Known words: silent.
    tok(['a red circle'])
