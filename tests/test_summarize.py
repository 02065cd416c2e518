"""`minikv summarize` end to end on the default model: batches with bad files, the hierarchical path,
sessions. Small settings throughout (short documents, few generated tokens): the CPU is slow."""
import json
from pathlib import Path

import pytest

from minikv.cli import main
from minikv.commands.summarize import read_document
from minikv.errors import MinikvError

FAST = ["-n", "6", "-q", "--device", "cpu"]

DOC_A = ("The lighthouse keeper climbed the stairs every evening to light the lamp. Ships passing the rocky "
         "coast relied on its beam to find the harbour. One winter the lamp failed during a storm, and the "
         "keeper kept a fire burning on the gallery all night so that no ship was lost.\n")
DOC_B = ("Bread is made from flour, water, salt and yeast. The yeast ferments the sugars in the dough and "
         "releases gas, which makes the bread rise. Baking sets the structure and browns the crust.\n")


@pytest.fixture(autouse=True)
def default_model(default_model_dir, monkeypatch):
    monkeypatch.setenv("MINIKV_MODEL", str(default_model_dir))


def jsonl(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_two_documents_and_bad_files(tmp_path, capsys):
    """Each bad file gets its own message; the good ones are still summarized; the exit status says so."""
    (tmp_path / "a.txt").write_text(DOC_A)
    (tmp_path / "b.txt").write_text(DOC_B)
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "binary.bin").write_bytes(b"PK\x03\x04\x00\x00binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    names = [str(tmp_path / n) for n in ("a.txt", "missing.txt", "empty.txt", "binary.bin", "latin1.txt", "b.txt")]
    assert main(["summarize", *names, "--jsonl", "-c", "512", *FAST]) == 1
    captured = capsys.readouterr()
    rows = {Path(r["file"]).name: r for r in jsonl(captured.out)}
    for good in ("a.txt", "b.txt"):
        r = rows[good]
        assert r["method"] == "whole" and r["parts"] == 1 and r["tokens"] > 30
        assert r["summary"].strip() and r["kv_bytes"] > 0 and r["seconds"] > 0
    errors = [line for line in captured.err.splitlines() if line.startswith("minikv: error:")]
    assert len(errors) == 4 and "Traceback" not in captured.err
    for bad, words in (("missing.txt", "no such file"), ("empty.txt", "empty"), ("binary.bin", "binary"),
                       ("latin1.txt", "UTF-8")):
        assert any(bad in e and words in e for e in errors), bad
        assert "error" in rows[bad]


def test_long_document_is_summarized_hierarchically(tmp_path, capsys):
    (tmp_path / "long.txt").write_text((DOC_A + DOC_B) * 5)
    assert main(["summarize", str(tmp_path / "long.txt"), "--jsonl", "-c", "192", *FAST]) == 0
    row = jsonl(capsys.readouterr().out)[0]
    assert row["method"] == "hierarchical" and row["parts"] >= 2 and row["tokens"] > 192
    assert row["summary"].strip()


def test_session_saves_the_document_for_another_run(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(DOC_A)
    session, first, second = str(tmp_path / "a.session"), tmp_path / "first", tmp_path / "second"
    args = ["-c", "512", *FAST]
    assert main(["summarize", str(tmp_path / "a.txt"), "--out", str(first), "--save-session", session, *args]) == 0
    assert main(["summarize", "--load-session", session, "--out", str(second), *args]) == 0
    direct = (first / "a.txt.summary.txt").read_text()
    assert direct.strip() and (second / f"{Path(session).name}.summary.txt").read_text() == direct
    # another context size is another store: refused with a clear message
    capsys.readouterr()
    assert main(["summarize", "--load-session", session, "-c", "256", *FAST]) == 1
    assert "other KV cache settings" in capsys.readouterr().err


@pytest.mark.parametrize("content, words", [(None, "no such file"), (b"", "empty"), (b"a\x00b", "binary"),
                                            (b"\xff\xfe", "UTF-8")])
def test_read_document_errors(tmp_path, content, words):
    path = tmp_path / "doc.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MinikvError, match=words):
        read_document(str(path))


@pytest.mark.parametrize("kv", ["fp16", "k4v2"])
def test_a_batch_summarizes_as_one_at_a_time(tmp_path, capsys, kv):
    """Documents of different lengths ingested into the rows of one store and decoded together
    (greedy) give the summaries each gets alone; 3 documents in batches of 2 also cover a partial batch."""
    docs = {"a.txt": DOC_A, "b.txt": DOC_B, "ab.txt": DOC_B + DOC_A}
    for name, text in docs.items():
        (tmp_path / name).write_text(text)
    names = [str(tmp_path / n) for n in docs]
    summaries = []
    for batch in ("1", "2"):
        assert main(["summarize", *names, "--jsonl", "-c", "512", "--kv", kv, "--batch", batch, *FAST]) == 0
        rows = jsonl(capsys.readouterr().out)
        assert [Path(r["file"]).name for r in rows] == list(docs)
        summaries.append([r["summary"] for r in rows])
    assert summaries[0] == summaries[1]
    assert len(set(summaries[0])) == 3  # three different documents, three different summaries
