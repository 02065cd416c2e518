"""The decode step (one token per sequence) captured as one CUDA graph and replayed.

At batch 1 a decode step is a few hundred small kernels whose launch cost, not memory
bandwidth, sets the speed. Replaying them as one graph removes that cost. A graph fixes
every tensor's address and shape, so it needs a store whose attention shapes never depend
on how many tokens it holds (`store.static`: `FullPrecisionStore(static=True)`, or a
QuantizedStore through its kernels), and inputs copied into buffers it owns. The store's
host-side bookkeeping (`advance`) stays outside the graph, and a step the store cannot run
from the device alone (`store.replayable()`: a quantized store's sink tokens) runs eagerly.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from minikv.errors import MinikvError
from minikv.store import FullPrecisionStore, KVStore


class GraphDecodeStep:
    """Callable (ids (B, 1), positions (B, 1)) -> logits (B, V), replaying a captured forward.

    Captured lazily at the first call the store can replay, with that call's real inputs: the
    warm-up runs then write exactly what the replay writes, so capturing never puts garbage in
    the store. Calls it cannot replay run the model eagerly.
    The returned logits are the graph's own output buffer, overwritten by the next call."""

    def __init__(self, model: torch.nn.Module, store: KVStore, compile: bool = False, warmup: int = 3) -> None:
        self.store, self.warmup = store, warmup
        # torch.compile fuses the small elementwise kernels (norms, RoPE, SiLU, residuals, the mask) that
        # otherwise cost more than the matrix-vector products at batch 1; the graph is still ours.
        self.compile = compile
        self.eager = model
        self.model = compiled(model, store) if compile else model
        self.graph: torch.cuda.CUDAGraph | None = None
        self.ids = self.positions = self.logits = None

    def _forward(self) -> Tensor:
        return self.model(self.ids, self.positions, self.store, last_only=True)[:, -1]

    def _capture(self, ids: Tensor, positions: Tensor) -> None:
        self.ids, self.positions = ids.clone(), positions.clone()
        side = torch.cuda.Stream(device=ids.device)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(side), self._compile_settings():  # warm-up off the capturing stream: lazy
            for _ in range(self.warmup):  # inits, allocator pools, compilation
                self._forward()
        torch.cuda.current_stream(ids.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()

    def _compile_settings(self) -> contextlib.AbstractContextManager:
        return compile_settings(self.store.n_layers) if self.compile else contextlib.nullcontext()

    @torch.inference_mode()
    def __call__(self, ids: Tensor, positions: Tensor) -> Tensor:
        if not self.store.replayable():
            return self.eager(ids, positions, self.store, last_only=True)[:, -1]
        if self.graph is None:
            self._capture(ids, positions)
        else:
            self.ids.copy_(ids)
            self.positions.copy_(positions)
        self.graph.replay()
        return self.logits


def compiled(model: torch.nn.Module, store: KVStore) -> torch.nn.Module:
    """torch.compile'd model for `store`, to run under compile_settings. A quantized store's attention
    launches Triton kernels from Python and keeps host bookkeeping, so it runs outside the compiled code
    (torch.compiler.disable, in QuantizedStore): graph breaks around it, still one CUDA graph around the
    whole step. Forgets whatever was compiled before (torch._dynamo.reset): the same model compiled for
    another store left frames that count against this one's recompile limit (`minikv bench --compile`
    compiles a quantized store's model, then the fp16 store's, which failed there)."""
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(model, fullgraph=isinstance(store, FullPrecisionStore), dynamic=False)


def compile_settings(n_layers: int) -> contextlib.AbstractContextManager:
    """Settings for the first calls of a `compiled` model, which compile it."""
    import torch._dynamo.config as dynamo
    import torch._inductor.config as inductor

    settings = contextlib.ExitStack()
    # Coordinate-descent tuning lets inductor turn each batch-1 matmul into its own reduction kernel
    # fused with its neighbours: measured 6.8 -> 5.9 ms/step at Llama-2-7B on an H100.
    settings.enter_context(inductor.patch(coordinate_descent_tuning=True))
    # Around a graph break (a quantized store's attention) each layer's attention is a frame of its own,
    # compiled for its layer index: one compilation per layer and input shape (a graph step sees one, a
    # model called directly with prefill chunks too), where dynamo's limit (8) left the rest eager.
    settings.enter_context(dynamo.patch(recompile_limit=max(dynamo.recompile_limit, 2 * n_layers)))
    return settings


def check_graphable(store: KVStore) -> None:
    if store.device.type != "cuda":
        raise MinikvError(f"CUDA graphs need --device cuda (the store is on {store.device})")
    if not getattr(store, "static", False):
        raise MinikvError("CUDA graphs need a store with static shapes (create it with static=True)")


def enable_cuda_graph(engine, compile: bool = False) -> None:
    """Make `engine` (a minikv.generate.Engine) decode through a captured CUDA graph (of a torch.compile'd
    step if `compile`: faster, but the first token waits for the compilation)."""
    check_graphable(engine.store)
    engine.decode_step = GraphDecodeStep(engine.model, engine.store, compile=compile)
