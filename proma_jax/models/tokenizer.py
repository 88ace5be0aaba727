"""One tokenizer interface for the character tokenizer and pretrained (Hugging Face / GGUF) ones.

`Tokenizer` is the protocol: `encode` adds no special tokens (callers add BOS/EOS explicitly),
`decode` drops special tokens, and `apply_chat_template` renders the checkpoint's own Jinja chat
template the way transformers does. `HFTokenizer` implements it over a `tokenizers.Tokenizer`,
built from a checkpoint directory (`from_hf_dir`) or from GGUF metadata (`from_gguf_metadata`).

`apply_chat_template` keeps transformers' name, so it keeps transformers' defaults for the
arguments it shares: `add_generation_prompt=False` (no assistant header appended: ask for it to
prompt a reply) and `tokenize=True` (the rendering's token ids, encoded without adding special
tokens, as transformers does for a chat rendering; `tokenize=False` gives the text). Both are
keyword-only: transformers' second positional argument is `tools`.

Usage:
  tok = from_hf_dir("checkpoints/Qwen3-0.6B")
  messages = [{"role": "user", "content": "What is 2 + 3?"}]
  ids = tok.apply_chat_template(messages, add_generation_prompt=True)
  prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  assert ids == tok.encode(prompt)
  text = tok.decode(ids)
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

# Special-token names a chat template may read (transformers' SPECIAL_TOKENS_ATTRIBUTES).
TEMPLATE_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                           "cls_token", "mask_token")

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
GGUF_CONTROL = 3
GGUF_USER_DEFINED = 4

# Qwen2's split regex (its tokenizer.json; llama.cpp's "qwen2" pre-tokenizer).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

GGUF_PRE_TYPES = ("default", "gpt-2", "gpt2", "smollm", "qwen2", "deepseek-r1-qwen")


@runtime_checkable
class Tokenizer(Protocol):
  """What the training and sampling code needs from a tokenizer.

  `encode` adds no special tokens; `decode` leaves special tokens out of the text;
  `apply_chat_template` has transformers' defaults (no generation prompt, token ids).
  """

  @property
  def eos_id(self) -> int: ...

  @property
  def pad_id(self) -> int: ...

  @property
  def bos_id(self) -> int | None: ...

  @property
  def vocab_size(self) -> int: ...

  @property
  def chat_template(self) -> str | None: ...

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False,
                          tokenize: bool = True) -> list[int] | str: ...


@dataclasses.dataclass(frozen=True, eq=False)
class HFTokenizer:
  """A `tokenizers.Tokenizer` with its special-token ids and Jinja chat template.

  Attributes:
    backend: the byte-level BPE (or other) tokenizer that maps text to ids.
    eos_id, pad_id, bos_id: special-token ids (bos_id None when the checkpoint has none).
    chat_template: Jinja source of the chat template, or None.
    special_tokens: template variables such as {"bos_token": "<s>", "eos_token": "</s>"}.
    add_bos: whether the checkpoint's own tokenizer prepends BOS to raw text. `encode` never
      does; a caller that feeds raw text (no chat template) prepends `bos_id` when this is True.
    chat_template_source: where the chat template was read, for error messages: the path of
      chat_template.jinja, "<dir>/tokenizer_config.json (chat_template)" or "<file>.gguf (GGUF
      metadata tokenizer.chat_template)"; None without a template or a known source.
  """

  backend: tokenizers.Tokenizer
  eos_id: int
  pad_id: int
  bos_id: int | None
  chat_template: str | None
  special_tokens: Mapping[str, str]
  add_bos: bool = False
  chat_template_source: str | None = None

  @property
  def vocab_size(self) -> int:
    """Number of token ids, added tokens included."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without special tokens (no BOS even if the post-processor adds one)."""
    return self.backend.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of each of `texts`, in one call of the backend (which spreads a batch over its
    threads): what checking thousands of prompts at once needs."""
    return [encoding.ids for encoding in
            self.backend.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` with special tokens skipped (transformers' skip_special_tokens=True)."""
    return self.backend.decode([int(token) for token in ids], skip_special_tokens=True)

  def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False,
                          tokenize: bool = True) -> list[int] | str:
    """`messages` rendered with the checkpoint's chat template, as transformers does.

    Args:
      messages: the conversation, dicts with "role" and "content" (keys whose value is None are
        dropped).
      add_generation_prompt: append the header that starts the assistant's reply (what a prompt
        to sample from needs). False by default, as in transformers.
      tokenize: return the token ids of the rendering (`encode`: no special tokens added, the
        template writes its own) rather than the text. True by default, as in transformers.

    Returns:
      The rendering's token ids when `tokenize`, else its text.

    Raises:
      ValueError: the tokenizer has no chat template.
      jinja2.exceptions.TemplateError: the template rejects the messages.
    """
    if self.chat_template is None:
      raise ValueError("tokenizer has no chat template; encode the prompt text directly")
    text = render_chat_template(self.chat_template, messages, add_generation_prompt,
                                self.special_tokens)
    return self.encode(text) if tokenize else text

  def check_chat_template(self, content: str = "What is 2 + 3?") -> None:
    """Renders the chat template once, on one user message `content` with the generation prompt,
    so that a template that cannot render fails here, before a run has written anything, rather
    than at its first prompt.

    Raises:
      ValueError: "<chat_template_source>: the chat template fails on a sample user message:
        <error type>: <message> (line <n> of the template)", chained to the Jinja error.
    """
    if self.chat_template is None:
      return
    try:
      self.apply_chat_template([{"role": "user", "content": content}],
                               add_generation_prompt=True, tokenize=False)
    except Exception as error:  # pylint: disable=broad-except  (any error of the user's template)
      source = self.chat_template_source or "the tokenizer's chat template"
      raise ValueError(f"{source}: the chat template fails on a sample user message: "
                       f"{describe_template_error(error)}") from error


def describe_template_error(error: BaseException) -> str:
  """`<error type>: <message> (line <n> of the template)` for an error raised while compiling or
  rendering a Jinja template: the line is the syntax error's, or the deepest template frame of a
  runtime error's traceback (Jinja rewrites those to the template's lines), left out if neither
  is known."""
  line = getattr(error, "lineno", None)
  frame = error.__traceback__
  while frame is not None:
    if frame.tb_frame.f_code.co_filename == "<template>":
      line = frame.tb_lineno
    frame = frame.tb_next
  where = f" (line {line} of the template)" if line is not None else ""
  return f"{type(error).__name__}: {error}{where}"


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
  """`source` compiled in a sandbox with the globals and filters transformers gives templates."""

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def strftime_now(format_string):
    return datetime.datetime.now().strftime(format_string)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(source)


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]],
                         add_generation_prompt: bool, special_tokens: Mapping[str, str]) -> str:
  """`template` rendered over `messages` (keys with value None dropped, as transformers does)."""
  messages = [{key: value for key, value in message.items() if value is not None}
              for message in messages]
  return _compile_template(template).render(
      messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
      **special_tokens)


def _read_json(path: str) -> dict:
  """The JSON object in `path`; ValueError naming the file if it is not valid JSON."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as error:
    raise ValueError(f"{path} is not valid JSON: {error}") from error


def _token_content(value: Any, path: str, key: str) -> str | None:
  """The token string of a tokenizer_config entry: a string, {"content": ...} or None."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  raise ValueError(f"{path}: {key} must be a string or a {{'content': ...}} dict, got {value!r}")


def _config_chat_template(value: Any, path: str) -> str | None:
  """The chat template of tokenizer_config's `chat_template`: a string, or the "default" entry of
  a list of {"name", "template"} dicts."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, list):
    templates = {entry.get("name"): entry.get("template") for entry in value}
    if "default" not in templates:
      raise ValueError(f"{path}: chat_template lists {sorted(map(str, templates))} "
                       "but no 'default' template")
    return templates["default"]
  raise ValueError(f"{path}: chat_template must be a string or a list of named templates")


def from_hf_dir(path: str | os.PathLike) -> HFTokenizer:
  """The tokenizer of a Hugging Face checkpoint directory.

  Reads tokenizer.json, tokenizer_config.json (bos/eos/pad tokens, chat template) and, if present,
  chat_template.jinja, which takes priority over the config's template as in transformers.
  Raises FileNotFoundError naming a missing file and ValueError naming a bad file, key or token.
  """
  path = os.fspath(path)
  tokenizer_path = os.path.join(path, "tokenizer.json")
  config_path = os.path.join(path, "tokenizer_config.json")
  for required in (tokenizer_path, config_path):
    if not os.path.isfile(required):
      raise FileNotFoundError(f"tokenizer file {required} does not exist")
  try:
    backend = tokenizers.Tokenizer.from_file(tokenizer_path)
  except Exception as error:  # tokenizers raises a bare Exception that names no file.
    raise ValueError(f"{tokenizer_path} is not a valid tokenizers file: {error}") from error
  config = _read_json(config_path)

  special_tokens = {}
  for key in TEMPLATE_SPECIAL_TOKENS:
    token = _token_content(config.get(key), config_path, key)
    if token is not None:
      special_tokens[key] = token

  def token_id(key: str) -> int | None:
    if key not in special_tokens:
      return None
    token = special_tokens[key]
    index = backend.token_to_id(token)
    if index is None:
      raise ValueError(
          f"{config_path}: {key} {token!r} is not in the vocabulary of {tokenizer_path}")
    return index

  eos_id = token_id("eos_token")
  if eos_id is None:
    raise ValueError(f"{config_path} has no eos_token")
  pad_id = token_id("pad_token")
  bos_id = token_id("bos_token")

  template_path = os.path.join(path, "chat_template.jinja")
  if os.path.isfile(template_path):
    with open(template_path, encoding="utf-8") as f:
      chat_template = f.read()
    template_source = template_path
  else:
    chat_template = _config_chat_template(config.get("chat_template"), config_path)
    template_source = None if chat_template is None else f"{config_path} (chat_template)"
  # transformers ignores tokenizer_config's add_bos_token when tokenizer.json exists: the
  # post-processor decides.
  add_bos = bos_id is not None and backend.encode("").ids[:1] == [bos_id]
  return HFTokenizer(backend, eos_id, eos_id if pad_id is None else pad_id, bos_id, chat_template,
                     special_tokens, add_bos, template_source)


def read_gguf_metadata(reader) -> dict[str, Any]:
  """Every key-value field of a `gguf.GGUFReader` as plain Python values (str, int, list, ...)."""
  return {name: field.contents() for name, field in reader.fields.items()}


def _gguf_pre_tokenizer(
    pre: str) -> tuple[normalizers.Normalizer | None, pre_tokenizers.PreTokenizer]:
  """(normalizer, pre-tokenizer) of llama.cpp's BPE pre-tokenizer type `pre`, as in the original
  tokenizer.json of the models that use it.

  gpt-2/gpt2/default: the GPT-2 regex (transformers' choice for "default"; llama.cpp's legacy
  default split differs). smollm: digits one by one, then the GPT-2 regex. qwen2: NFC, then
  Qwen2's regex (single digits, no space before letters).
  """
  gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in ("default", "gpt-2", "gpt2"):
    return None, gpt2
  if pre == "smollm":
    return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
  if pre in ("qwen2", "deepseek-r1-qwen"):
    split = pre_tokenizers.Split(tokenizers.Regex(_QWEN2_SPLIT), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return normalizers.NFC(), pre_tokenizers.Sequence([split, byte_level])
  raise ValueError(f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                   f"supported: {GGUF_PRE_TYPES}")


def from_gguf_metadata(meta: Mapping[str, Any], source: str | None = None) -> HFTokenizer:
  """The byte-level BPE tokenizer described by GGUF metadata (`read_gguf_metadata`) of the file
  `source` (a path, named by `HFTokenizer.chat_template_source`; None: unknown).

  Vocabulary from tokenizer.ggml.tokens, merges from tokenizer.ggml.merges ("left right"), the
  pre-tokenizer from tokenizer.ggml.pre; control tokens (token_type 3) become special added
  tokens, user-defined ones (4) plain added tokens. Raises ValueError naming a missing key or an
  unsupported tokenizer model or pre-tokenizer.
  """
  model = _gguf_get(meta, "tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(f"GGUF tokenizer model {model!r} (tokenizer.ggml.model) is not supported; "
                     "only 'gpt2' (byte-level BPE)")
  tokens = list(_gguf_get(meta, "tokenizer.ggml.tokens"))
  backend = _gguf_backend(meta, tokens)
  ids = _gguf_special_ids(meta, len(tokens))
  special_tokens = {key: tokens[index] for key, index in ids.items() if index is not None}
  pad_id = ids["eos_token"] if ids["pad_token"] is None else ids["pad_token"]
  chat_template = meta.get("tokenizer.chat_template")
  template_source = None
  if chat_template is not None:
    template_source = ("GGUF metadata tokenizer.chat_template" if source is None
                       else f"{source} (GGUF metadata tokenizer.chat_template)")
  return HFTokenizer(backend, ids["eos_token"], pad_id, ids["bos_token"], chat_template,
                     special_tokens, bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                     template_source)


def _gguf_get(meta: Mapping[str, Any], key: str) -> Any:
  if key not in meta:
    raise ValueError(f"GGUF metadata has no {key}")
  return meta[key]


def _gguf_backend(meta: Mapping[str, Any], tokens: list[str]) -> tokenizers.Tokenizer:
  """The byte-level BPE of GGUF metadata: vocabulary `tokens`, its merges and pre-tokenizer, and
  its control (special) and user-defined added tokens."""
  merges = []
  for merge in _gguf_get(meta, "tokenizer.ggml.merges"):
    pair = tuple(merge.split(" "))
    if len(pair) != 2:
      raise ValueError(f"GGUF merge {merge!r} is not two tokens separated by one space")
    merges.append(pair)
  normalizer, pre_tokenizer = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))

  vocab = {token: index for index, token in enumerate(tokens)}
  backend = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
  backend.normalizer = normalizer
  backend.pre_tokenizer = pre_tokenizer
  backend.decoder = decoders.ByteLevel()
  token_types = meta.get("tokenizer.ggml.token_type", [])
  backend.add_special_tokens([
      tokenizers.AddedToken(token, special=True, normalized=False)
      for token, kind in zip(tokens, token_types) if kind == GGUF_CONTROL])
  backend.add_tokens([
      tokenizers.AddedToken(token, special=False, normalized=False)
      for token, kind in zip(tokens, token_types) if kind == GGUF_USER_DEFINED])
  return backend


def _gguf_special_ids(meta: Mapping[str, Any], vocab_size: int) -> dict[str, int | None]:
  """{"bos_token", "eos_token", "unk_token", "pad_token"} -> its id in GGUF metadata, or None;
  an id outside the vocabulary or a missing EOS raises ValueError."""

  def token_id(key: str) -> int | None:
    index = meta.get(f"tokenizer.ggml.{key}")
    if index is not None and not 0 <= index < vocab_size:
      raise ValueError(f"GGUF tokenizer.ggml.{key} {index} is outside the vocabulary "
                       f"[0, {vocab_size})")
    return index

  ids = {"bos_token": token_id("bos_token_id"), "eos_token": token_id("eos_token_id"),
         "unk_token": token_id("unknown_token_id"), "pad_token": token_id("padding_token_id")}
  if ids["eos_token"] is None:
    raise ValueError("GGUF metadata has no tokenizer.ggml.eos_token_id")
  return ids
