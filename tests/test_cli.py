"""`minikv run` end to end: prompt sources, output, and every bad input giving one clear line."""
import io
import os
import signal
import subprocess
import sys

import pytest

import minikv
from minikv import cli, loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The three primary colours are"
GREEDY = ["--temp", "0", "-c", "256"]


@pytest.fixture
def run(default_model_dir, cached_load, capsys, monkeypatch):
    """minikv run ARGS in-process on the default model: (exit status, stdout, stderr)."""
    monkeypatch.setattr(loader, "load", cached_load)

    def call(*args, stdin=None):
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        status = cli.main(["run", "-m", str(default_model_dir), *args])
        out, err = capsys.readouterr()
        return status, out, err

    return call


@pytest.fixture(scope="module")
def expected(default_model_dir):
    """What the Python API answers, greedily: the CLI must print exactly that."""
    llm = minikv.load(default_model_dir, device="cpu", ctx=256)
    return llm.complete(PROMPT, temperature=0, max_tokens=12)


def test_prompt_streams_only_the_generated_text(run, expected):
    status, out, err = run("-p", PROMPT, "-n", "12", *GREEDY)
    assert status == 0 and out == expected and err == ""


def test_prompt_from_file(run, expected, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text(PROMPT, encoding="utf-8")
    assert run("-f", str(path), "-n", "12", *GREEDY)[:2] == (0, expected)


@pytest.mark.parametrize("flag", [["-p", "-"], []])
def test_prompt_from_stdin(run, expected, flag):
    assert run(*flag, "-n", "12", *GREEDY, stdin=PROMPT.encode())[:2] == (0, expected)


def test_echo_prints_the_prompt_first(run, expected):
    status, out, _ = run("-p", PROMPT, "-n", "12", "--echo", *GREEDY)
    assert out == PROMPT + expected


def test_chat_echo_shows_the_template_with_the_system_prompt(run):
    status, out, _ = run("-p", "Hi", "--chat", "-sys", "Be terse.", "--echo", "-n", "0", *GREEDY)
    assert status == 0 and out.startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi")


def test_n_zero_prefills_only(run):
    status, out, err = run("-p", PROMPT, "-n", "0", "-v", *GREEDY)
    assert status == 0 and out == ""
    assert "prefill: 5 tokens" in err and "decode:  0 tokens" in err and "KV store" in err


def test_stop_string_ends_output_before_it(run, expected):
    stop = expected.strip().split()[2]
    status, out, _ = run("-p", PROMPT, "-n", "12", "--stop", stop, *GREEDY)
    assert status == 0 and out == expected[:expected.index(stop)]


def test_verbose_reports_speed_tokens_stop_reason_and_kv_bytes(run):
    status, _, err = run("-p", PROMPT, "-n", "3", "-v", *GREEDY)
    assert status == 0
    assert "tok/s" in err and "decode:  3 tokens" in err and "stop: length" in err and "bytes" in err


def test_context_full_stops_with_a_notice(run):
    status, out, err = run("-p", PROMPT, "-n", "-1", "--temp", "0", "-c", "9")
    assert status == 0 and out
    assert "9-token context is full" in err


# --- bad input: exit != 0, one line, no traceback -------------------------------------------------------------

def one_line_error(status, err, text):
    assert status == 1
    assert err.startswith("minikv: error: ") and err.count("\n") == 1, err
    assert text in err


def test_missing_model_folder(run, tmp_path):
    status, out, err = run("-p", "hi", "-m", str(tmp_path / "nope"))
    one_line_error(status, err, "nope")


def test_non_utf8_prompt_file(run, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    one_line_error(*run("-f", str(path))[::2], "not valid UTF-8")


def test_missing_prompt_file(run, tmp_path):
    one_line_error(*run("-f", str(tmp_path / "absent.txt"))[::2], "absent.txt")


@pytest.mark.parametrize("args, stdin", [(["-p", ""], None), (["-p", "-"], b""), ([], b"")])
def test_empty_prompt(run, args, stdin):
    one_line_error(*run(*args, stdin=stdin)[::2], "empty")


def test_no_prompt_at_a_terminal(run, monkeypatch):
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    one_line_error(*run()[::2], "no prompt")


def test_prompt_longer_than_the_context(run):
    one_line_error(*run("-p", "word " * 40, "-c", "16")[::2], "16-token context")


@pytest.mark.parametrize("args, text", [
    (["--temp", "-1"], "temperature"),
    (["--top-p", "0"], "top-p"),
    (["-sys", "hello"], "--chat"),
])
def test_bad_values_are_errors(run, args, text):
    one_line_error(*run("-p", "hi", *args)[::2], text)


@pytest.mark.parametrize("args", [
    ["--dtype", "fp7"], ["--kv", "nope"], ["-n", "-2"], ["-c", "0"], ["-c", "many"], ["--device", "tpu"],
    ["-p", "a", "-f", "b"],
])
def test_bad_flags_are_usage_errors(run, capsys, args):
    with pytest.raises(SystemExit) as e:
        run("-p", "hi", *args) if "-p" not in args else run(*args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: minikv run") and "error:" in err


# --- the real process: pipes and Ctrl-C -----------------------------------------------------------------------

def minikv_process(default_model_dir, *args, **kw):
    return subprocess.Popen([sys.executable, "-m", "minikv.cli", "run", "-m", str(default_model_dir), *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_piped_stdin_in_a_real_process(default_model_dir, expected):
    p = minikv_process(default_model_dir, "-n", "12", *GREEDY, stdin=subprocess.PIPE)
    out, err = p.communicate(PROMPT.encode())
    assert p.returncode == 0 and out.decode() == expected and b"Traceback" not in err


def test_ctrl_c_stops_cleanly_with_the_output_so_far(default_model_dir):
    p = minikv_process(default_model_dir, "-p", "1, 2, 3, 4, 5,", "-n", "-1", "--temp", "0", "-c", "2048")
    first = p.stdout.read(1)  # generation has started
    p.send_signal(signal.SIGINT)
    out, err = p.communicate()
    assert p.returncode == 130
    assert first and b"Traceback" not in err


def test_session_of_a_document_answers_like_the_joined_prompt(run, tmp_path):
    doc, question = "The cat sat on the mat. The dog slept by the door.\n", "Question: where did the cat sit?\nAnswer:"
    (tmp_path / "doc.txt").write_text(doc, encoding="utf-8")
    saved = tmp_path / "doc.session"
    assert run("-f", str(tmp_path / "doc.txt"), "-n", "0", "--save-session", str(saved), *GREEDY)[:2] == (0, "")
    status, out, _ = run("--load-session", str(saved), "-p", question, "-n", "8", *GREEDY)
    assert status == 0 and out and out == run("-p", doc + question, "-n", "8", *GREEDY)[1]


def test_missing_session_file(run, tmp_path):
    one_line_error(*run("-p", "hi", "--load-session", str(tmp_path / "none.session"))[::2], "none.session")


def test_closed_stdout_ends_quietly(default_model_dir):
    """`minikv run ... | head -c 1`: the reader leaves, minikv stops without a traceback."""
    p = minikv_process(default_model_dir, "-p", "1, 2, 3, 4, 5,", "-n", "64", "--temp", "0")
    assert p.stdout.read(1)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait() == 141 and b"Traceback" not in err
