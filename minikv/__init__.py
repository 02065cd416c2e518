"""minikv: a small LLaMA/Mistral inference app with a quantized KV store."""
__version__ = "0.1.0"


def __getattr__(name: str):
    """`minikv.load` without importing torch at `import minikv` (PEP 562)."""
    if name == "load":
        from minikv.api import load

        return load
    raise AttributeError(f"module 'minikv' has no attribute {name!r}")
