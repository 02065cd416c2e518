"""Generation: greedy decoding equals transformers' token for token; sampling masks; streamed text."""
import pytest
import torch

import minikv
from minikv.api import LLM
from minikv.generate import TextStream
from minikv.sampling import SamplingParams, apply_repeat_penalty, sample

PROMPTS = {
    "prose": "The history of the printing press begins",
    "code": 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "chat": [{"role": "user", "content": "Give me three tips for learning to play the guitar."}],
}
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return minikv.load(default_model_dir, device="cpu", dtype="fp32", ctx=256, kv="fp16")


def prompt_ids(llm, name):
    prompt = PROMPTS[name]
    if isinstance(prompt, list):
        return llm.tokenizer.encode(llm.chat_text(prompt), add_bos=False)
    return llm.tokenizer.encode(prompt)


@pytest.fixture(scope="module")
def hf_greedy(default_model_dir, llm):
    """transformers' greedy continuation of every prompt, end-of-sequence token removed."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    eos = llm.tokenizer.eos_ids
    out = {}
    for name in PROMPTS:
        ids = torch.tensor([prompt_ids(llm, name)])
        with torch.no_grad():
            seq = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=eos, pad_token_id=eos[0])
        new = seq[0, ids.shape[1]:].tolist()
        out[name] = new[:-1] if new and new[-1] in eos else new
    return out


@pytest.mark.parametrize("name, chunk", [("prose", 512), ("code", 512), ("chat", 512), ("chat", 5)])
def test_greedy_matches_transformers(llm, hf_greedy, name, chunk):
    """Prefill (whole, or in chunks of 5) then one-token decode steps give transformers' greedy tokens."""
    engine = llm.new_engine()
    engine.prefill_chunk = chunk
    logits = engine.ingest(prompt_ids(llm, name))
    got = list(engine.generate_ids(logits, SamplingParams(temperature=0, max_tokens=NEW_TOKENS)))
    assert len(got) >= 16  # a real continuation, not an immediate end of text
    assert got == hf_greedy[name]


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_int8_store_greedy_equals_full_precision(llm, hf_greedy, name):
    """With a 32-token window most of the context sits in the int8 history; greedy output is unchanged."""
    from minikv.presets import KVSettings

    int8 = LLM(llm.model, llm.tokenizer, KVSettings.from_preset("int8", window=32), ctx=256)
    engine = int8.engine
    logits = engine.ingest(prompt_ids(llm, name))
    got = list(engine.generate_ids(logits, SamplingParams(temperature=0, max_tokens=NEW_TOKENS)))
    assert engine.store.n_hist(engine.store.length) >= 32  # the history really holds tokens
    assert got == hf_greedy[name]


def test_seeded_sampling_is_reproducible(llm):
    def run(seed):
        return llm.complete("Once upon a time", temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed,
                            max_tokens=6)

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_context_full_stops_generation(llm):
    """A store with room for 4 more tokens after the prompt stops after them, saying why."""
    ids = llm.tokenizer.encode("Once upon a time")
    small = LLM(llm.model, llm.tokenizer, llm.kv, ctx=len(ids) + 4)
    text = small.complete("Once upon a time", temperature=0, max_tokens=50)
    assert small.stats.stop_reason == "context"
    assert small.stats.generated_tokens == 5  # the last one is returned without being stored
    assert small.engine.store.length == len(ids) + 4 and text


# --- sampling, on a fixed distribution: 4000 draws in one batch ------------------------------------------------

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def draws(params, probs=PROBS, n=4000):
    logits = probs.log()[None].expand(n, -1).contiguous()
    return sample(logits, params, torch.Generator().manual_seed(0))


def plain(**kw):
    return SamplingParams(**{"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, **kw})


def test_unfiltered_sampling_follows_the_distribution():
    counts = torch.bincount(draws(plain()), minlength=4) / 4000
    assert torch.allclose(counts, PROBS, atol=0.03)


@pytest.mark.parametrize("params, kept", [
    (plain(top_k=2), {0, 1}),
    (plain(top_k=3), {0, 1, 2}),
    (plain(top_p=0.7), {0, 1}),  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    (plain(top_p=0.9), {0, 1, 2}),
    (plain(min_p=0.2), {0, 1, 2}),  # threshold 0.2 * 0.5 = 0.1
    (plain(min_p=0.5), {0, 1}),
    (SamplingParams(temperature=0), {0}),
])
def test_filters_keep_exactly_the_expected_tokens(params, kept):
    assert set(draws(params).tolist()) == kept


@pytest.mark.parametrize("temperature", [0.3, 2.0])
def test_temperature_rescales_the_distribution(temperature):
    counts = torch.bincount(draws(plain(temperature=temperature)), minlength=4) / 4000
    assert torch.allclose(counts, torch.softmax(PROBS.log() / temperature, 0), atol=0.03)


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    out = apply_repeat_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5]]


def test_repeat_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    params = SamplingParams(temperature=0, repeat_penalty=2.0)
    assert sample(logits, params, None, torch.tensor([[0]])).item() == 1
    assert sample(logits, params, None, None).item() == 0


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=2.0),
                                 dict(top_k=-1), dict(repeat_penalty=0.0), dict(max_tokens=-1)])
def test_validate_refuses_bad_values(bad):
    with pytest.raises(minikv.errors.MinikvError):
        SamplingParams(**bad).validate()


# --- TextStream: incremental detokenization -------------------------------------------------------------------

class ByteTokenizer:
    """Token id = one UTF-8 byte, so a character can be split across tokens."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def stream(text, stop=()):
    s = TextStream(ByteTokenizer(), list(stop))
    pieces = []
    for b in text.encode():
        pieces.append(s.push(b))
        if s.stopped:
            break
    pieces.append(s.flush())
    return pieces, s.stopped


def test_split_utf8_is_held_until_complete():
    pieces, _ = stream("é✓🙂")
    assert "".join(pieces) == "é✓🙂"
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:2] == ["", "é"]  # the first byte of é alone releases nothing


def test_stop_string_ends_the_text_and_is_not_emitted():
    pieces, stopped = stream("hello STOP world", stop=["STOP"])
    assert stopped and "".join(pieces) == "hello "


def test_possible_stop_prefix_is_held_back_then_released():
    s = TextStream(ByteTokenizer(), ["END"])
    out = [s.push(b) for b in b"the EN"]
    assert "".join(out) == "the "  # "EN" could start "END"
    assert s.push(ord("x")) == "ENx" and not s.stopped


def test_stop_string_split_across_tokens_of_a_multibyte_text():
    pieces, stopped = stream("naïve→STOP", stop=["→STOP"])
    assert stopped and "".join(pieces) == "naïve"
