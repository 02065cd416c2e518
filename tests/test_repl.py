"""The chat REPL driven through prompt_toolkit's pipe input: turns, commands, Ctrl-C, context policy."""
import io

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

import minikv
from minikv import cli, loader
from minikv.api import LLM
from minikv.repl import PipedInput, Repl
from minikv.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24)
Q1, Q2 = "What is the capital of France?", "And of Italy?"


@pytest.fixture(scope="module")
def loaded(default_model_dir):
    return minikv.load(default_model_dir, device="cpu", ctx=512)


@pytest.fixture
def llm(loaded):
    """A fresh conversation store on the shared weights."""
    return LLM(loaded.model, loaded.tokenizer, loaded.kv, ctx=512)


def chat(llm, keys, tmp_path, params=GREEDY, **kw):
    """Type `keys` into a REPL (\\r is Enter), then end of input; returns (repl, what it wrote)."""
    out = io.StringIO()
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        pipe.close()
        repl = Repl(llm, params, history_file=tmp_path / "history", input=pipe, output=DummyOutput(), out=out, **kw)
        assert repl.run() == 0
    return repl, out.getvalue()


def test_multi_turn_conversation_prefills_only_the_new_tokens(llm, tmp_path):
    repl, out = chat(llm, f"{Q1}\r{Q2}\r", tmp_path)
    assert [m["role"] for m in repl.messages] == ["user", "assistant", "user", "assistant"]
    first, second = repl.messages[1]["content"], repl.messages[3]["content"]
    assert "Paris" in first and "Rome" in second and first in out and second in out

    # turn 1 left its prompt and reply in the store; turn 2 prefilled only the tokens after them
    encode = lambda text: llm.tokenizer.encode(text, add_bos=False)  # noqa: E731
    after_turn_1 = len(encode(llm.chat_text(repl.messages[:1]))) + len(encode(first))
    assert llm.stats.prompt_tokens == len(encode(llm.chat_text(repl.messages[:3]))) - after_turn_1 < 20
    # and answered as a fresh prefill of the whole conversation does
    assert LLM(llm.model, llm.tokenizer, llm.kv, ctx=512).chat(repl.messages[:3], params=GREEDY) == second


def test_ctrl_c_during_a_reply_keeps_the_partial_reply_and_the_repl_usable(llm, tmp_path):
    count = 0

    def ctrl_c_after_3_pieces(piece):
        nonlocal count
        count += 1
        if count == 3:
            raise KeyboardInterrupt

    repl, out = chat(llm, f"Tell me a long story about a dragon.\r{Q1}\r", tmp_path, on_piece=ctrl_c_after_3_pieces)
    partial = repl.messages[1]
    assert partial["role"] == "assistant" and partial["content"] and partial["content"] in out
    assert "[interrupted]" in out
    assert len(repl.messages) == 4 and "Paris" in repl.messages[3]["content"]
    assert llm.stats.prompt_tokens < 30  # the cut reply stayed in the store: turn 2 only added its tokens


def test_ctrl_c_at_the_prompt_clears_the_line_and_ctrl_d_quits(llm, tmp_path):
    repl, out = chat(llm, "never sent\x03/stats\r\x04/reset\r", tmp_path)
    assert repl.messages == []
    assert "context: 0 / 512 tokens" in out and "[conversation cleared]" not in out


def test_reset_forgets_the_conversation(llm, tmp_path):
    repl, out = chat(llm, f"{Q1}\r/reset\r/stats\r", tmp_path)
    assert repl.messages == [] and "[conversation cleared]" in out
    assert "context: 0 / 512 tokens" in out and llm.engine.tokens == []


def test_set_changes_sampling(llm, tmp_path):
    hot = SamplingParams(temperature=1.5, max_tokens=24)
    repl, out = chat(llm, f"/set temp 0\r/set top-k 5\r/set n -1\r/set seed 3\r/set top-p 2\r/set temp x\r{Q1}\r",
                     tmp_path, params=hot)
    p = repl.params
    assert (p.temperature, p.top_k, p.max_tokens, p.seed, p.top_p) == (0.0, 5, 512, 3, hot.top_p)
    assert "error: top-p must be in (0, 1]" in out and "error: temp needs a number" in out
    greedy = LLM(llm.model, llm.tokenizer, llm.kv, ctx=512).chat([{"role": "user", "content": Q1}], params=p)
    assert repl.messages[1]["content"] == greedy


def test_system_prompt_reaches_the_model(llm, tmp_path):
    repl, out = chat(llm, f"/system Always answer in French.\r{Q1}\r/system\r", tmp_path)
    assert repl.system == "Always answer in French."
    held = llm.tokenizer.decode(llm.engine.tokens)
    assert "system\nAlways answer in French.<|im_end|>" in held and "helpful AI assistant" not in held
    assert out.count("system prompt: Always answer in French.") == 2


def test_stats_reports_context_kv_bytes_and_speeds(llm, tmp_path):
    repl, out = chat(llm, f"{Q1}\r/stats\r", tmp_path)
    stats = out[out.index("context:"):]
    assert f"context: {llm.engine.store.length} / 512 tokens" in stats
    assert f"({llm.engine.store.nbytes()} bytes)" in stats
    assert "prefill:" in stats and "decode:" in stats and "tok/s" in stats and "stop: eos" in stats


def test_multi_line_input_and_persistent_history(llm, tmp_path):
    keys = "/system line one\\\rline two\x1b\rline three\r/exit\r/reset\r"
    repl, out = chat(llm, keys, tmp_path)
    assert repl.system == "line one\nline two\nline three"
    assert "[conversation cleared]" not in out  # /exit quit before it
    again, _ = chat(llm, "", tmp_path)
    assert list(again.session.history.load_history_strings())[:2] == ["/exit", "/system line one\nline two\nline three"]


def test_unknown_command_and_help(llm, tmp_path):
    _, out = chat(llm, "/nope\r/help\r", tmp_path)
    assert "unknown command /nope" in out and "/set" in out and "Esc then Enter" in out


def test_context_full_drops_the_oldest_exchanges_and_keeps_the_system_prompt(loaded, tmp_path):
    small = LLM(loaded.model, loaded.tokenizer, loaded.kv, ctx=96)
    questions = ["Name a colour.", "Name a fruit.", "Name an animal.", "Name a country.", "Name a tree."]
    repl, out = chat(small, "/system Be brief.\r" + "".join(q + "\r" for q in questions), tmp_path,
                     params=SamplingParams(temperature=0, max_tokens=8))
    assert "oldest messages were dropped]" in out
    assert repl.messages[-2]["content"] == questions[-1] and repl.messages[0]["content"] != questions[0]
    system = small.tokenizer.encode("<|im_start|>system\nBe brief.<|im_end|>", add_bos=False)
    assert small.engine.tokens[:len(system)] == system


def test_a_message_larger_than_the_context_is_refused(loaded, tmp_path):
    small = LLM(loaded.model, loaded.tokenizer, loaded.kv, ctx=64)
    repl, out = chat(small, "word " * 80 + f"\r{Q1}\r", tmp_path, params=SamplingParams(temperature=0, max_tokens=8))
    assert "error: the message does not fit in the 64-token context" in out
    assert [m["content"] for m in repl.messages[:1]] == [Q1]


def test_piped_input_reads_messages_with_continued_lines():
    piped = PipedInput(io.StringIO("one\ntwo \\\nthree\nlast \\\n"))
    assert [piped.prompt(), piped.prompt(), piped.prompt()] == ["one", "two \nthree", "last "]
    with pytest.raises(EOFError):
        piped.prompt()


def test_chat_command_saves_and_reloads_the_conversation(default_model_dir, cached_load, monkeypatch, capsys,
                                                         tmp_path):
    """`minikv chat` on a piped stdin; the reloaded chat only prefills the new message."""
    monkeypatch.setattr(loader, "load", cached_load)
    saved = tmp_path / "chat.session"

    def chat_command(text, *args):
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
        status = cli.main(["chat", "-m", str(default_model_dir), "-c", "256", "--temp", "0", "-n", "24", "-v",
                           "--history-file", str(tmp_path / "h"), *args])
        return status, capsys.readouterr().out

    status, out = chat_command(f"{Q1}\n", "--save-session", str(saved))
    assert status == 0 and "Paris" in out
    status, out = chat_command(f"{Q2}\n", "--load-session", str(saved))
    assert status == 0 and "Rome" in out
    prefilled = int(out.split("prefill: ")[1].split()[0])
    assert 0 < prefilled < 20


def test_minikv_alone_starts_the_chat(cached_load, monkeypatch, capsys, tmp_path, default_model_dir):
    monkeypatch.setattr(loader, "load", cached_load)
    monkeypatch.setenv("MINIKV_MODEL", str(default_model_dir))
    monkeypatch.setattr("sys.stdin", io.StringIO("/set temp 0\n/exit\n"))
    monkeypatch.setattr("minikv.repl.DEFAULT_HISTORY", tmp_path / "history")
    assert cli.main([]) == 0
    out, err = capsys.readouterr()
    assert "minikv chat" in err and "temp = 0.0" in out
