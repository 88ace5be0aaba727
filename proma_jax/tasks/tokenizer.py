"""Character-level tokenizer and batch encoding of prompts and completions.

Token ids: PAD=0, BOS=1, EOS=2, then one id per character of a fixed alphabet. `encode` adds no
special tokens (the `proma_jax.models.tokenizer.Tokenizer` interface). Prompts are encoded
as BOS + characters and LEFT-padded, so every prompt ends at the same position and sampling starts
in one column for the whole batch. Completions (answers for a supervised warm start) are encoded as
characters + EOS and RIGHT-padded, like sampled responses.
"""

from __future__ import annotations

import dataclasses
import functools
import string
from typing import Sequence

import numpy as np

PAD = 0
BOS = 1
EOS = 2
NUM_SPECIAL = 3

DEFAULT_ALPHABET = string.digits + string.ascii_lowercase + "+-*/=:,.?!()<>_ "


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
  """Maps each character of `alphabet` to one token id, after the special ids PAD, BOS, EOS.

  Usage:
    tok = CharTokenizer()
    ids = tok.encode("12+35=")              # ['1', '2', '+', '3', '5', '=']
    tok.decode([BOS] + ids + [EOS, PAD])     # "12+35="
  """

  alphabet: str = DEFAULT_ALPHABET
  pad_id: int = dataclasses.field(default=PAD, init=False)
  bos_id: int = dataclasses.field(default=BOS, init=False)
  eos_id: int = dataclasses.field(default=EOS, init=False)
  chat_template: str | None = dataclasses.field(default=None, init=False)

  def __post_init__(self):
    if len(set(self.alphabet)) != len(self.alphabet):
      raise ValueError(f"alphabet has repeated characters: {self.alphabet!r}")

  @property
  def vocab_size(self) -> int:
    return NUM_SPECIAL + len(self.alphabet)

  @functools.cached_property
  def _char_to_id(self) -> dict[str, int]:
    return {char: NUM_SPECIAL + index for index, char in enumerate(self.alphabet)}

  def check_text(self, text: str) -> None:
    """Raises ValueError naming the first character of `text` outside the alphabet."""
    for position, char in enumerate(text):
      if char not in self._char_to_id:
        raise ValueError(
            f"character {char!r} at position {position} of {text!r} is not in the tokenizer "
            f"alphabet {self.alphabet!r}")

  def encode(self, text: str) -> list[int]:
    """Token ids of the characters of `text`, without special tokens."""
    self.check_text(text)
    return [self._char_to_id[char] for char in text]

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` up to the first EOS, skipping PAD and BOS."""
    chars = []
    for token in ids:
      token = int(token)
      if token == EOS:
        break
      if token in (PAD, BOS):
        continue
      if not NUM_SPECIAL <= token < self.vocab_size:
        raise ValueError(f"token id {token} is outside the vocabulary [0, {self.vocab_size})")
      chars.append(self.alphabet[token - NUM_SPECIAL])
    return "".join(chars)

  def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False,
                          tokenize: bool = True) -> list[int] | str:
    """Raises ValueError: the character tokenizer has no chat template (the signature is the
    `Tokenizer` protocol's, transformers' defaults)."""
    raise ValueError("tokenizer has no chat template; encode the prompt text directly")


def encode_prompts(
    tokenizer: CharTokenizer, prompts: Sequence[str], width: int
) -> tuple[np.ndarray, np.ndarray]:
  """BOS + prompt characters, LEFT-padded with PAD to `width` columns.

  Returns:
    tokens_BxP: int32 token ids, each row ending with the prompt's last character.
    valid_BxP:  float32, 1 where the token is part of the prompt (BOS included), 0 on padding.
  Raises ValueError if an encoded prompt is longer than `width`.
  """
  tokens_BxP = np.full((len(prompts), width), PAD, dtype=np.int32)
  valid_BxP = np.zeros((len(prompts), width), dtype=np.float32)
  for row, prompt in enumerate(prompts):
    ids = [BOS] + tokenizer.encode(prompt)
    if len(ids) > width:
      raise ValueError(f"prompt {prompt!r} needs {len(ids)} tokens (with BOS) > width {width}")
    tokens_BxP[row, width - len(ids):] = ids
    valid_BxP[row, width - len(ids):] = 1.0
  return tokens_BxP, valid_BxP


def encode_completions(
    tokenizer: CharTokenizer, answers: Sequence[str], width: int
) -> tuple[np.ndarray, np.ndarray]:
  """Answer characters + EOS, RIGHT-padded with PAD to `width` columns (supervised warm start).

  Returns:
    tokens_BxL: int32 token ids of the target response.
    mask_BxL:   float32, 1 on the answer characters and the EOS, 0 on padding.
  Raises ValueError if an encoded answer (with EOS) is longer than `width`.
  """
  tokens_BxL = np.full((len(answers), width), PAD, dtype=np.int32)
  mask_BxL = np.zeros((len(answers), width), dtype=np.float32)
  for row, answer in enumerate(answers):
    ids = tokenizer.encode(answer) + [EOS]
    if len(ids) > width:
      raise ValueError(f"answer {answer!r} needs {len(ids)} tokens (with EOS) > width {width}")
    tokens_BxL[row, :len(ids)] = ids
    mask_BxL[row, :len(ids)] = 1.0
  return tokens_BxL, mask_BxL
