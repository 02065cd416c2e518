"""Triton kernels over minikv's quantized KV store, each with a plain-PyTorch twin in
kernels.reference. The store calls kernels.store_attention on CUDA (and on the CPU under
TRITON_INTERPRET=1 when asked, `--kv-attention triton`), else its own reference path."""
