"""Inference through one captured CUDA graph: ``CUDAGraphForward(model, example)(x)``.

The forward of a model in eval mode reads no tensor values on the host (the RIB factor cache is validated from
version counters, the window gathers use cached index tensors), so it can be captured once for a fixed input shape
and replayed: no Python and no kernel launches per call. Worth it where launches dominate (small tiles, small
models); large frames are bound by the GPU work itself.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class CUDAGraphForward:
    """Replays one captured ``model(x)`` for inputs of ``example``'s shape, dtype and device.

    Warm-up calls run first (on a side stream, as capture requires) so that the RIB factors and gather indices are
    cached before the capture; the graph then reads those cached tensors and the weights in place. Hence: capture
    again after changing the parameters, the model's dtype or its device. The returned tensor is the graph's static
    output, overwritten by the next call: clone it to keep it.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, warmup: int = 2):
        if example.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA input, got one on {example.device}")
        if model.training:
            raise ValueError("put the model in eval mode first: CUDA graphs are for inference here")
        self.model = model
        self.static_input = example.detach().clone()
        side = torch.cuda.Stream(device=example.device)
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(max(1, warmup)):
                model(self.static_input)
        torch.cuda.current_stream(example.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.static_output = model(self.static_input)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.static_input
        if x.shape != s.shape or x.dtype != s.dtype or x.device != s.device:
            raise ValueError(f"this graph was captured for {tuple(s.shape)} {s.dtype} on {s.device}, got "
                             f"{tuple(x.shape)} {x.dtype} on {x.device}: capture another one for that input")
        s.copy_(x)
        self.graph.replay()
        return self.static_output
