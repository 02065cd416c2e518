"""Tokenizers (byte-level BPE and SentencePiece) and chat templates against transformers and sentencepiece."""
from __future__ import annotations

from pathlib import Path

import pytest

from minikv import chat_template
from minikv.errors import MinikvError
from minikv.generate import TextStream
from minikv.tokenizer import Tokenizer, load_tokenizer

SAMPLES = [
    "Hello, world!",
    "in 1999 there were 12,345 cats and 3.14159 dogs; call 555-0100 by 2024.",
    "Whitespace   runs,\ttabs\t\tand\n\nnewlines\n   \n end  ",
    "Unicode: café, naïve, Ωmega, 日本語のテキスト, 中文, 한국어, emoji 🐱👍🏽🇫🇷 done",
    "def f(x: int) -> int:\n    return x ** 2  # squared\n\nprint(f(12))\n",
    "It's what they'd've said — “quoted” and 'single' text... ok?!",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}],
]


@pytest.fixture(scope="module")
def bpe(default_model_dir) -> Tokenizer:
    return load_tokenizer(default_model_dir)


@pytest.fixture(scope="module")
def hf_bpe(default_model_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(default_model_dir)


def train_sentencepiece(folder: Path, vocab_size: int = 400) -> Path:
    """A tiny LLaMA-style SentencePiece BPE model (byte fallback, no normalization) on essay text."""
    import sentencepiece

    from minikv.textdata import essays

    text = essays("dev")[:20_000]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, num_threads=1, minloglevel=2)
    return folder / "tokenizer.model"


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sp")
    train_sentencepiece(folder)
    return folder


# --- byte-level BPE (the default model) -------------------------------------------------------

@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_matches_transformers_and_round_trips(bpe, hf_bpe, text):
    ids = bpe.encode(text)
    assert ids == hf_bpe(text, add_special_tokens=False)["input_ids"]
    assert bpe.decode(ids) == text


def test_bpe_splits_digits_one_by_one(bpe):
    """The smollm pre-tokenizer: each digit is its own token, whitespace before a number stays apart."""
    vocab = bpe.backend.tok
    assert [vocab.id_to_token(i) for i in bpe.encode(" 2024")] == ["Ġ", "2", "0", "2", "4"]
    # Digits are split off before the GPT-2 regex, so whitespace ending before a digit is one run;
    # the GPT-2 regex alone would give "Ġ", "Ċ" (it keeps the last whitespace for the next word).
    assert [vocab.id_to_token(i) for i in bpe.encode("a \n1")] == ["a", "ĠĊ", "1"]
    pieces = [vocab.id_to_token(i) for i in bpe.encode(SAMPLES[1])]
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digit_pieces == [c for c in SAMPLES[1] if c.isdigit()]


def test_bpe_conventions(bpe):
    assert (bpe.bos_id, bpe.eos_ids, bpe.add_bos, bpe.vocab_size) == (1, [2], False, 49152)
    assert bpe.encode("hi")[0] != bpe.bos_id
    assert bpe.encode("hi", add_bos=True)[0] == bpe.bos_id
    assert bpe.encode("<|im_start|>user\nhi<|im_end|>") == [1, *bpe.encode("user\nhi"), 2]
    assert bpe.decode([1, *bpe.encode("user"), 2]) == "<|im_start|>user<|im_end|>"  # not a prepended BOS: kept


def test_decode_streams_multibyte_characters(bpe):
    """TextStream releases whole characters only, so an emoji split over tokens is never garbled."""
    text = "cat 🐱👍🏽 and 日本語!"
    stream = TextStream(bpe, [])
    pieces = [stream.push(i) for i in bpe.encode(text)]
    assert "".join(pieces) + stream.flush() == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(bpe, hf_bpe, messages, add_generation_prompt):
    want = hf_bpe.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert bpe.apply_chat_template(messages, add_generation_prompt) == want


def test_builtin_chatml_when_no_template(bpe):
    plain = Tokenizer(bpe.backend, {k: v for k, v in bpe.config.items() if k != "chat_template"}, bpe.eos_ids)
    got = plain.apply_chat_template(CONVERSATIONS[0])
    assert got == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


# --- SentencePiece ------------------------------------------------------------------------------

@pytest.mark.parametrize("text", SAMPLES)
def test_sentencepiece_matches_reference_and_transformers(sp_folder, text):
    import sentencepiece
    import transformers

    ours = load_tokenizer(sp_folder)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))
    ids = ours.encode(text, add_bos=False)
    assert ids == sp.encode(text)
    assert ours.decode(ids) == text
    # transformers' Llama tokenizer (converted from tokenizer.model) agrees too.
    hf = transformers.LlamaTokenizerFast.from_pretrained(sp_folder)
    assert ids == hf(text, add_special_tokens=False)["input_ids"]


def test_sentencepiece_conventions(sp_folder):
    tok = load_tokenizer(sp_folder)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, [2], True)
    ids = tok.encode("Hello")
    assert ids[0] == 1 and ids[1:] == tok.encode("Hello", add_bos=False)
    assert tok.encode("<s>Hello")[:2] == [1, tok.encode("Hello", add_bos=False)[0]]  # no double BOS
    assert tok.decode([*ids, 2]) == "Hello</s>"  # BOS dropped, EOS kept


def test_builtin_llama2_template(sp_folder):
    got = load_tokenizer(sp_folder).apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}])
    assert got == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]"


def test_builtin_llama3_template():
    template = chat_template.builtin_template({"<|start_header_id|>", "<|eot_id|>"})
    got = chat_template.render(template, [{"role": "user", "content": "Hi"}], bos_token="<|begin_of_text|>")
    assert got == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_template_errors_are_user_errors():
    with pytest.raises(MinikvError, match="alternate"):
        chat_template.render(chat_template.LLAMA2, [{"role": "assistant", "content": "x"}], bos_token="<s>",
                             eos_token="</s>")
    with pytest.raises(MinikvError, match="rejected"):  # the sandbox refuses attribute tricks
        chat_template.render("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])
    with pytest.raises(MinikvError, match="does not parse"):
        chat_template.render("{% for %}", [])


def test_missing_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(MinikvError, match="no tokenizer"):
        load_tokenizer(tmp_path)
