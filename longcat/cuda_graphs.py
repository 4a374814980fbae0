"""CUDA-graph capture and replay of one denoising step of the LongCat-Video DiT.

One forward pass launches thousands of kernels (norms, GEMMs, attention and element-wise ops in
every block). ``CUDAGraphStep`` records them once into a CUDA graph per input signature and then
replays that graph at every denoising step, so the host issues one launch instead of thousands.
Before a replay the new latents, timestep and text are copied into the graph's input buffers.

    longcat.accelerate(model, attention="bsa", fused=True)  # Triton ops: no host sync in forward
    step = longcat.CUDAGraphStep(model)
    text = model.prepare_text(prompt_embeds, prompt_mask)   # once per prompt (packing syncs)
    for t in timesteps:
        noise_pred = step(latents, t.expand(batch), text)   # one graph replay per step

Limits: inference only (every call runs under ``torch.no_grad()``). Not with
``offload="blocks"`` (block weights move between host and device during the step). The forward
must make no host sync and no host-to-device copy, which holds for the Triton op tables of
``longcat.accelerate(model, attention="bsa" or "dense", fused=True)``, not for ``SDPA_OPS`` or
``REFERENCE_OPS``. A KV cache is read in place, not copied (it can be many GB): the graph holds
the caller's cache tensors until another cache is passed (which captures anew) or ``reset()``.
The per-block alternative is torch.compile's CUDA graphs,
``longcat.accelerate(model, compile={"mode": "reduce-overhead"})``; do not combine the two.
Without CUDA (a model on the CPU) the model is called eagerly, with a one-time warning, so the
same code runs everywhere.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from longcat.kernels import rope as _rope
from longcat.kernels._runtime import warn_once

from .accelerate import acceleration_report
from .model import LongCatVideoTransformer3DModel, PreparedText
from .ops import reference_varlen_attention, sdpa_varlen_attention

__all__ = ["CUDAGraphStep"]


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: Tuple[torch.Tensor, ...]  # static latents, timestep, text, cu_seqlens: copied into before each replay
    kv_cache: Tuple[torch.Tensor, ...]  # the caller's cache tensors the graph reads (held so they stay allocated)
    kv_layout: tuple  # (data_ptr, stride) of each: recognises the same cache at a later call
    output: torch.Tensor  # written by every replay
    # RoPE tables the kernels read, cached on the device by longcat.kernels.rope; held in case that
    # cache is cleared, which would free memory the graph still reads.
    tables: tuple


def _signature(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.device


def _model_state(model: LongCatVideoTransformer3DModel) -> tuple:
    """What a captured graph depends on besides its inputs: the op table, where every weight lives
    (new tensors after ``load_state_dict(assign=True)``, ``.to()``, quantization or re-acceleration;
    a graph would read their freed memory) and each block's BSA setting."""
    pointers = tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))
    bsa = tuple((b.attn.enable_bsa, repr(b.attn.bsa_params)) for b in model.blocks)
    return model.ops, pointers, bsa


def _check_offload(model) -> None:
    report = acceleration_report(model)
    if report is not None and report.offload == "blocks":
        raise ValueError(
            "CUDAGraphStep cannot capture a model accelerated with offload='blocks': its block weights move "
            "between host and device during the step; accelerate it without offload"
        )


def _check_capturable_ops(ops) -> None:
    """Refuse op tables known to sync with the host in every forward (capture would fail)."""
    host_bound = []
    if ops.varlen_attention in (sdpa_varlen_attention, reference_varlen_attention):
        host_bound.append("varlen_attention (reads the text offsets on the host)")
    if ops.rope_3d is _rope.rope_3d_reference:
        host_bound.append("rope_3d (copies its table from host memory)")
    if host_bound:
        raise ValueError(
            f"model.ops ({ops.name!r}) cannot be captured in a CUDA graph: {'; '.join(host_bound)}. "
            "Use the Triton ops: longcat.accelerate(model, attention='bsa', fused=True)"
        )


def _cache_tensors(kv_cache_dict) -> Dict[str, torch.Tensor]:
    """The cache's tensors by name (``kv_cache_dict[i][0]`` is block i's k)."""
    if not kv_cache_dict:
        return {}
    if not isinstance(kv_cache_dict, dict):
        raise TypeError(
            f"kv_cache_dict must be the {{block index: (k, v)}} dict of model(..., return_kv=True), got {type(kv_cache_dict).__name__}"
        )
    tensors = {}
    for i, kv in kv_cache_dict.items():
        if not (isinstance(kv, (tuple, list)) and len(kv) == 2 and all(isinstance(t, torch.Tensor) for t in kv)):
            raise TypeError(f"kv_cache_dict[{i!r}] must be a (k, v) pair of tensors, got {type(kv).__name__}")
        tensors[f"kv_cache_dict[{i!r}][0]"], tensors[f"kv_cache_dict[{i!r}][1]"] = kv
    return tensors


class CUDAGraphStep:
    """Run ``model``'s forward (one denoising step) through CUDA graphs; see the module docstring.

    model: a ``LongCatVideoTransformer3DModel`` on a CUDA device, accelerated with Triton ops
        (``longcat.accelerate(model, attention="bsa", fused=True)``); on the CPU it is called eagerly.
    warmup: eager forward passes on a side stream before each capture (they compile the Triton
        kernels and build the device-side RoPE and timestep tables, which capture cannot do).
    clone_output: return a copy of the graph's output. With False the graph's own output tensor is
        returned: the next call of this step (any input signature) overwrites it.

    One graph is captured per input signature (shapes and dtypes of the latents, timestep and
    text, ``num_cond_latents``, the KV cache's shapes). When the model's weights are replaced by
    other tensors, its op table or its BSA settings change, every graph is dropped and captured
    again at the next call; weights changed in place are simply read by the next replay.
    """

    def __init__(self, model: LongCatVideoTransformer3DModel, *, warmup: int = 2, clone_output: bool = True):
        if not isinstance(model, LongCatVideoTransformer3DModel):
            raise TypeError(
                f"CUDAGraphStep needs a longcat.LongCatVideoTransformer3DModel, got {type(model).__name__}: upstream's "
                "forward reads the text lengths on the host, which a CUDA graph cannot hold; load the checkpoint with "
                "LongCatVideoTransformer3DModel.from_pretrained instead"
            )
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
            raise ValueError(f"warmup must be a positive int (eager passes before a capture), got {warmup!r}")
        _check_offload(model)
        self.model = model
        self.warmup = warmup
        self.clone_output = clone_output
        self._graphs: Dict[tuple, _Captured] = {}
        self._pool = None
        self._model_state: Optional[tuple] = None

    @property
    def num_graphs(self) -> int:
        """How many graphs are captured now."""
        return len(self._graphs)

    def reset(self) -> None:
        """Drop every graph and its buffers (and the references to a KV cache)."""
        self._graphs.clear()
        self._pool = None

    def __call__(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        prepared_text: PreparedText,
        *,
        num_cond_latents: int = 0,
        kv_cache_dict: Optional[dict] = None,
        return_kv: bool = False,
    ) -> torch.Tensor:
        """The model's output for latents [B, C, T, H, W] at ``timestep`` ([B] or [B, T]), with the
        text from ``model.prepare_text``; ``num_cond_latents`` and ``kv_cache_dict`` as in the
        model's forward. Inference only: runs under ``torch.no_grad()``."""
        if return_kv:
            raise ValueError(
                "return_kv is not supported: build the KV cache once per video with an eager call, "
                "model(cond_latents, timestep, None, prepared_text=text, return_kv=True, skip_crs_attn=True)"
            )
        if not isinstance(prepared_text, PreparedText):
            raise TypeError(
                "prepared_text must be the PreparedText of model.prepare_text(encoder_hidden_states, "
                f"encoder_attention_mask), got {type(prepared_text).__name__}"
            )
        num_cond_latents = int(num_cond_latents or 0)
        cache = _cache_tensors(kv_cache_dict)
        inputs = {"hidden_states": hidden_states, "timestep": timestep,
                  "prepared_text.text": prepared_text.text, "prepared_text.cu_seqlens": prepared_text.cu_seqlens}
        device = self.model.device
        for name, t in itertools.chain(inputs.items(), cache.items()):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.device != device:
                raise ValueError(
                    f"{name} is on {t.device}, the model on {device}: move it there first "
                    "(a CUDA graph reads its inputs from device memory and cannot copy from the host)"
                )
        with torch.no_grad():
            if device.type != "cuda":
                warn_once(
                    "cuda_graphs:eager",
                    f"longcat.CUDAGraphStep: the model is on {device}, not a CUDA device; calling it eagerly (no CUDA graph).",
                )
                return self.model(hidden_states, timestep, None, prepared_text=prepared_text,
                                  num_cond_latents=num_cond_latents, kv_cache_dict=kv_cache_dict)
            with torch.cuda.device(device):
                return self._replay(tuple(inputs.values()), num_cond_latents, kv_cache_dict, cache)

    def _replay(self, inputs, num_cond_latents, kv_cache_dict, cache) -> torch.Tensor:
        state = _model_state(self.model)
        if state != self._model_state:
            self.reset()
            _check_offload(self.model)
            _check_capturable_ops(self.model.ops)
            self._model_state = state
        key = (tuple(_signature(t) for t in inputs), num_cond_latents,
               tuple((name, _signature(t)) for name, t in cache.items()))
        kv_layout = tuple((t.data_ptr(), t.stride()) for t in cache.values())
        captured = self._graphs.get(key)
        if captured is not None and captured.kv_layout != kv_layout:
            # Another cache of the same shapes: the graph reads the cache in place, so capture on the
            # new one (after releasing the old graph, whose memory the new capture can reuse).
            del self._graphs[key]
            captured = None
        if captured is None:
            captured = self._capture(inputs, num_cond_latents, kv_cache_dict, tuple(cache.values()), kv_layout)
            self._graphs[key] = captured
        for static, new in zip(captured.inputs, inputs):
            static.copy_(new)
        captured.graph.replay()
        return captured.output.clone() if self.clone_output else captured.output

    def _capture(self, inputs, num_cond_latents, kv_cache_dict, kv_cache, kv_layout) -> _Captured:
        static = tuple(t.clone(memory_format=torch.contiguous_format) for t in inputs)
        x, t, text, cu_seqlens = static

        def forward():
            return self.model(x, t, None, prepared_text=PreparedText._trusted(text, cu_seqlens),
                              num_cond_latents=num_cond_latents, kv_cache_dict=kv_cache_dict)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one pool: graphs of this step share memory
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                output = forward()
        except RuntimeError as e:
            raise RuntimeError(
                f"CUDA graph capture of the forward failed ({e}); the forward must make no host sync and no "
                "host-to-device copy: accelerate the model with the Triton ops, longcat.accelerate(model, "
                "attention='bsa', fused=True)"
            ) from e
        return _Captured(graph, static, kv_cache, kv_layout, output, tuple(_rope._PAIR_TABLES.values()))
