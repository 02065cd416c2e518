"""Triton kernels over minikv's quantized KV store, each with a plain-PyTorch twin in
kernels.reference. The store calls kernels.store_attention on CUDA and its own reference on CPU."""
