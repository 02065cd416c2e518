"""minikv: a small LLaMA/Mistral inference app with a quantized KV store."""
__version__ = "0.1.0"
