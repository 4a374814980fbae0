"""``longcat.accelerate(model)``: make a live LongCat-Video DiT fast and small in one call.

Works on our ``LongCatVideoTransformer3DModel`` and on an upstream LongCat-Video DiT instance,
recognised by its module tree (DESIGN.md section 3: ``blocks[i].adaLN_modulation``,
``attn.qkv/q_norm/k_norm/proj``, ``cross_attn.q_linear/kv_linear/q_norm/k_norm/proj``,
``ffn.w1/w2/w3``, ``pre_crs_attn_norm``); no upstream code is imported. Every argument is checked
before anything is changed (``compile`` options by ``torch.compile`` itself, on a stand-in
function), and a failure while patching rolls the model back: after a failed call the model is
exactly as before it (same module objects, tensors, hooks, forwards and flags).

The patch is recorded on the model: calling ``accelerate`` again first undoes the previous patch
(so it is idempotent), and ``longcat.restore(model)`` undoes it.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field, replace
from typing import List, Optional, Union

import torch
import torch.nn as nn

from .ffn import pack_ffn, unpack_ffn
from .model import LongCatVideoTransformer3DModel, block_forward
from .ops import ATTENTION_BACKENDS, DiTOps, SDPA_OPS, kernel_ops

__all__ = ["accelerate", "restore", "AccelerationReport", "UnsupportedModelError", "recognise"]

_STATE_ATTR = "_longcat_acceleration"

BLOCK_STRUCTURE = {
    "adaLN_modulation": ("1",),
    "attn": ("qkv", "q_norm", "k_norm", "proj"),
    "cross_attn": ("q_linear", "kv_linear", "q_norm", "k_norm", "proj"),
    "ffn": ("w1", "w2", "w3"),
    "pre_crs_attn_norm": (),
}
MODEL_STRUCTURE = ("x_embedder", "t_embedder", "y_embedder", "blocks", "final_layer")


class UnsupportedModelError(TypeError):
    """The model's structure is not a LongCat-Video DiT this toolkit can patch."""


@dataclass
class AccelerationReport:
    kind: str  # "longcat" or "upstream"
    ops: str
    blocks_patched: int
    bsa_blocks: int
    quantized_linears: int = 0
    quantization: Optional[str] = None
    offload: Optional[str] = None
    compiled: bool = False
    context_parallel: Optional[str] = None
    chunking: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"longcat.accelerate: {self.kind} model, {self.blocks_patched} blocks on ops '{self.ops}'",
            f"  block-sparse attention enabled in {self.bsa_blocks} blocks",
            f"  quantized Linear layers: {self.quantized_linears}" + (f" ({self.quantization})" if self.quantization else ""),
            f"  offload: {self.offload or 'none'}; torch.compile: {'yes' if self.compiled else 'no'}",
            f"  context parallelism: {self.context_parallel or 'none'}; frame chunks: {self.chunking or 'none'}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def recognise(model: nn.Module) -> str:
    """'longcat' for our class, 'upstream' for a module tree with upstream's structure; raises
    UnsupportedModelError naming what is missing otherwise."""
    if isinstance(model, LongCatVideoTransformer3DModel):
        return "longcat"
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    missing = [name for name in MODEL_STRUCTURE if not hasattr(model, name)]
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        missing.append("blocks (a non-empty nn.ModuleList)")
    else:
        for i, block in enumerate(blocks):
            for child, grandchildren in BLOCK_STRUCTURE.items():
                sub = getattr(block, child, None)
                if sub is None:
                    missing.append(f"blocks.{i}.{child}")
                    continue
                for g in grandchildren:
                    if not hasattr(sub, g) and not (isinstance(sub, nn.Sequential) and g.isdigit() and int(g) < len(sub)):
                        missing.append(f"blocks.{i}.{child}.{g}")
            for attr in ("num_heads", "head_dim"):
                for child in ("attn", "cross_attn"):
                    if hasattr(block, child) and not hasattr(getattr(block, child), attr):
                        missing.append(f"blocks.{i}.{child}.{attr}")
            if missing:
                break
    if missing:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a LongCat-Video DiT this toolkit recognises; missing: {', '.join(missing[:10])}"
        )
    return "upstream"


def _check_text_lengths(y_seqlen, rows: int) -> None:
    """Upstream's per-sample text lengths (host ints) become the attention kernels' offsets:
    non-negative and summing to the packed text's rows, checked where the offsets are made."""
    lengths = [int(n) for n in y_seqlen]
    if not lengths or min(lengths) < 0 or sum(lengths) != rows:
        raise ValueError(f"y_seqlen must be non-negative text lengths summing to the {rows} packed text tokens, got {lengths}")


def _upstream_block_forward(block, x, y, t, y_seqlen, latent_shape, num_cond_latents=None, return_kv=False, kv_cache=None, skip_crs_attn=False):
    """Upstream's block calling convention (text packed as [1, L_total, C] plus a list of
    per-sample lengths) mapped onto ``block_forward``."""
    text = y.reshape(-1, y.shape[-1])
    # Every block of one forward call receives the same packed text tensor: build the offsets
    # once (one host-to-device copy per call, not one per block) and keep them on that tensor.
    cached = getattr(y, "_longcat_cu_seqlens", None)
    if cached is None or cached[0] != tuple(y_seqlen):
        _check_text_lengths(y_seqlen, text.shape[0])
        lengths = torch.as_tensor(list(y_seqlen), dtype=torch.int32, device=x.device)
        cached = (tuple(y_seqlen), torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0)))
        y._longcat_cu_seqlens = cached
    cu = cached[1]
    if kv_cache is not None:
        kv_cache = (kv_cache[0].to(x.device), kv_cache[1].to(x.device))
    return block_forward(
        block, x, t, text, cu, tuple(int(s) for s in latent_shape), block._longcat_ops,
        int(num_cond_latents or 0), return_kv, kv_cache, skip_crs_attn,
    )


def _model_split_hw(model) -> tuple:
    split = getattr(model, "cp_split_hw", None)
    if split is None and isinstance(getattr(model, "config", None), dict):
        split = model.config.get("cp_split_hw")
    return tuple(int(s) for s in (split or (1, 1)))


def _resolve_context_parallel(model, kind: str, context_parallel):
    """The ContextParallel the blocks use, checked against the model's own split."""
    from .context_parallel import ContextParallel, context_parallel as make_context_parallel

    split = _model_split_hw(model)
    splits_itself = split != (1, 1)
    if context_parallel is None:
        if kind == "upstream" and splits_itself:
            import torch.distributed as dist

            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            if world != split[0] * split[1]:
                raise ValueError(
                    f"the model splits its tokens over cp_split_hw={list(split)} windows: pass the context-parallel "
                    "process group it uses as accelerate(model, context_parallel=group)"
                )
            return make_context_parallel(None, split)
        return None
    if isinstance(context_parallel, ContextParallel):
        cp = context_parallel
    else:
        cp = make_context_parallel(context_parallel, split if splits_itself else None)
    if splits_itself and tuple(cp.split_hw) != split:
        raise ValueError(f"context_parallel split_hw {cp.split_hw} differs from the model's cp_split_hw {list(split)}")
    if kind == "upstream" and not splits_itself:
        raise ValueError(
            "this upstream model was built without cp_split_hw, so its forward does not split the tokens over "
            "ranks; build it with cp_split_hw (and upstream's context-parallel setup) to use context parallelism"
        )
    heads = model.blocks[0].attn.num_heads
    if heads % cp.size:
        raise ValueError(f"context parallelism over {cp.size} ranks needs num_heads ({heads}) divisible by {cp.size}")
    return cp


def _set_bsa(model, bsa) -> None:
    if bsa is None:
        return
    for block in model.blocks:
        if isinstance(bsa, dict):
            block.attn.bsa_params = dict(bsa)
            block.attn.enable_bsa = True
        else:
            block.attn.enable_bsa = bool(bsa)


def _identity(x):
    return x


def _compile_options(compile) -> Optional[dict]:
    """torch.compile keyword arguments for the blocks (None: no compile), checked by torch.compile
    on a stand-in function so that a bad mode, backend or keyword fails before the model changes."""
    if isinstance(compile, bool):
        return {"dynamic": False} if compile else None
    if not isinstance(compile, dict):
        raise TypeError(f"compile must be a bool or a dict of torch.compile keyword arguments, got {type(compile).__name__}")
    options = {"dynamic": False, **compile}
    try:
        torch.compile(_identity, **options)
    except Exception as e:  # torch raises TypeError, RuntimeError or its own InvalidBackend
        raise ValueError(f"compile={compile!r} is refused by torch.compile: {e}") from None
    return options


def _snapshot(model: nn.Module):
    """What ``accelerate`` may change, kept so a failed call can be undone: every module's own
    attributes (children, parameters, buffers, hooks, patched forwards, flags; dicts copied, the
    dict objects themselves kept) and every parameter's data (block offload swaps it in place)."""
    modules = []
    for m in model.modules():
        attrs = {k: (v, v.copy() if isinstance(v, dict) else None) for k, v in vars(m).items()}
        modules.append((m, attrs))
    data = [(p, p.data) for p in model.parameters()]
    previous = getattr(model, _STATE_ATTR, None)
    offloader = previous.get("offload") if previous else None
    handles = list(offloader.handles) if offloader is not None else None
    return modules, data, offloader, handles


def _roll_back(snapshot) -> None:
    modules, data, offloader, handles = snapshot
    for m, attrs in modules:
        current = vars(m)
        for k in [k for k in current if k not in attrs]:
            del current[k]
        for k, (obj, contents) in attrs.items():
            if contents is not None:
                obj.clear()
                obj.update(contents)
            current[k] = obj
    for p, d in data:
        p.data = d
    if offloader is not None:
        offloader.handles = handles


def accelerate(
    model: nn.Module,
    *,
    attention: str = "auto",
    quantize: Union[None, str, object] = None,
    fused: bool = True,
    bsa: Union[None, bool, dict] = None,
    offload: Optional[str] = None,
    compile: Union[bool, dict] = False,
    ffn_chunk_frames: Optional[int] = None,
    attention_chunk_frames: Optional[int] = None,
    context_parallel=None,
    ops: Optional[DiTOps] = None,
    verbose: bool = False,
    offload_prefetch: int = 1,
    memory_budget: Union[None, int, str] = None,
    budget_latent: tuple = (48, 88, 160),
    budget_batch: int = 1,
) -> nn.Module:
    """Patch ``model`` in place and return it.

    attention: "auto" | "bsa" | "dense" | "sdpa" | "reference" (see ``longcat.ops.kernel_ops``);
        BSA runs where a block enables it (upstream's ``enable_bsa()``/``disable_bsa()`` keep working).
    quantize: None, "int8", "fp8", "int8-dynamic", "fp8-dynamic" or a ``longcat.quant`` config.
    fused: Triton fused element-wise ops (LayerNorm-modulate, residual + norm, QK-norm + RoPE, SwiGLU).
    bsa: None keeps each block's setting; True/False enables/disables BSA; a dict sets
        ``bsa_params`` (upstream keys: sparsity, cdf_threshold, chunk_3d_shape_q/k) and enables it.
    offload: None, or "blocks": block weights stay in pinned CPU memory and each block is copied to
        the GPU just before it runs, the next one prefetched on a side stream.
    compile: wrap each block's forward in ``torch.compile`` (True, or a dict of torch.compile
        keyword arguments such as ``{"backend": "aot_eager", "fullgraph": True}``).
    ffn_chunk_frames: run the FFN and the final layer this many latent frames at a time.
    attention_chunk_frames: run whole blocks this many latent frames of queries at a time
        (inference): only the residual stream and the self-attention K and V span the sequence,
        the smallest activation peak (``longcat.model.chunked_block_forward``). Not combined with
        context parallelism, which already divides the activations over the ranks.
    context_parallel: Ulysses context parallelism (``longcat.context_parallel``): a
        ``ContextParallel``, or a process group (its split is the model's ``cp_split_hw`` when that
        is set, else ``balanced_split``). Each rank holds a spatial window of the tokens and
        attends on its share of the heads. An upstream model built with ``cp_split_hw`` splits
        its tokens itself: pass the process group it uses (default: the whole world, when its
        size matches).
    ops: an explicit op table (overrides attention/fused).
    offload_prefetch: with offload="blocks", how many blocks are copied ahead (1 + this many resident).
    memory_budget: e.g. "8GB": quantize, offload and the two chunk sizes left at None are chosen
        by ``longcat.pipeline_plan.fit_dit``, the cheapest whose planned denoising-step peak at
        ``budget_latent`` (T, H, W; default the 720p refinement) x ``budget_batch`` fits; the
        choice and its planned peak are printed and noted in the report. Raises
        ``MemoryBudgetError`` naming the smallest budget that fits when nothing does.
    """
    kind = recognise(model)
    budget_note = None
    if memory_budget is not None:
        quantize, offload, offload_prefetch, ffn_chunk_frames, attention_chunk_frames, budget_note = _fit_budget(
            model, memory_budget, budget_latent, budget_batch, attention, quantize, offload, offload_prefetch,
            ffn_chunk_frames, attention_chunk_frames)
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
    if offload not in (None, "blocks"):
        raise ValueError(f"offload must be None or 'blocks', got {offload!r}")
    if not isinstance(offload_prefetch, int) or isinstance(offload_prefetch, bool) or offload_prefetch < 1:
        raise ValueError(f"offload_prefetch must be a positive int (blocks copied ahead), got {offload_prefetch!r}")
    if bsa is not None and not isinstance(bsa, (bool, dict)):
        raise TypeError(f"bsa must be None, a bool or a dict of bsa_params, got {type(bsa).__name__}")
    if ops is None:
        ops = kernel_ops(attention, fused, ffn_chunk_frames, attention_chunk_frames)
    elif not isinstance(ops, DiTOps):
        raise TypeError(f"ops must be a longcat.ops.DiTOps, got {type(ops).__name__}")
    cp = _resolve_context_parallel(model, kind, context_parallel)
    if cp is not None:
        if ops.attention_chunk_frames:
            raise ValueError("attention_chunk_frames cannot be combined with context parallelism (each rank already holds 1/size of the activations)")
        ops = ops.replace(context_parallel=cp)
    if isinstance(bsa, dict):
        from .model import _bsa_kwargs

        _bsa_kwargs(bsa)  # validate before changing anything
    if quantize is not None:
        from longcat.quant import resolve_config

        resolve_config(quantize)  # validate before changing anything
    compile_options = _compile_options(compile)

    snapshot = _snapshot(model)
    try:
        report = _patch(model, kind, ops, cp, bsa, quantize, offload, offload_prefetch, compile_options, budget_note)
    except BaseException:
        offloader = (getattr(model, _STATE_ATTR, None) or {}).get("offload")
        if offloader is not None and offloader.handles:
            offloader.remove()  # puts the weights back before the module state is restored
        _roll_back(snapshot)
        raise
    if verbose:
        print(report)
    return model


def _patch(model, kind, ops, cp, bsa, quantize, offload, offload_prefetch, compile_options, budget_note) -> AccelerationReport:
    """Apply the checked settings (``accelerate`` undoes a partial patch if this raises)."""
    if getattr(model, _STATE_ATTR, None) is not None:
        restore(model)

    state = {"kind": kind, "ops_before": getattr(model, "ops", None), "bsa_before": [(b.attn.enable_bsa, b.attn.bsa_params) for b in model.blocks], "offload": None}
    setattr(model, _STATE_ATTR, state)  # from here on, a failure can find the offloader to undo
    _set_bsa(model, bsa)
    if kind == "longcat":
        model.set_ops(ops)
    for block in model.blocks:
        block._longcat_ops = ops
        if kind == "upstream":
            block.forward = types.MethodType(_upstream_block_forward, block)
    report = AccelerationReport(kind=kind, ops=ops.name, blocks_patched=len(model.blocks),
                                bsa_blocks=sum(bool(b.attn.enable_bsa) for b in model.blocks))
    if quantize is not None:
        from longcat.quant import quantize as quantize_model

        quantize_model(model, quantize)
        report.quantized_linears = sum(type(m).__name__ == "QuantizedLinear" for m in model.modules())
        report.quantization = quantize if isinstance(quantize, str) else type(quantize).__name__
        state["quantized"] = True
    if offload is None:
        # One w1|w3 GEMM per FFN (``longcat.ffn``). Not with offload: the offloader moves tensors
        # one by one, which would leave a second, stale copy of the packed weight.
        packed = sum(pack_ffn(block.ffn) for block in model.blocks)
        report.notes.append(f"FFN w1|w3 packed into one GEMM in {packed} of {len(model.blocks)} blocks")
    if offload == "blocks":
        from .offload import BlockOffloader

        state["offload"] = BlockOffloader(model.blocks, prefetch=offload_prefetch)
        report.offload = "blocks"
        if offload_prefetch != 1:
            report.notes.append(f"block offload copies {offload_prefetch} blocks ahead")
    if compile_options is not None:
        for block in model.blocks:
            block._longcat_eager_forward = block.forward
            block.forward = torch.compile(block.forward, **compile_options)
        report.compiled = True
    if cp is not None:
        report.context_parallel = f"{cp.size} ranks, split_hw {cp.split_hw}"
    if ops.attention_chunk_frames or ops.ffn_chunk_frames:
        report.chunking = f"blocks {ops.attention_chunk_frames or 'whole'}, FFN {ops.ffn_chunk_frames or ops.attention_chunk_frames}"
    if budget_note:
        report.notes.append(budget_note)
    state["report"] = report
    return report


def _fit_budget(model, memory_budget, latent, batch, attention, quantize, offload, offload_prefetch, ffn_chunk_frames,
                attention_chunk_frames):
    """Map ``memory_budget`` onto the keyword arguments the caller left open (None)."""
    from .pipeline_plan import fit_dit

    config = getattr(model, "config", None)
    if not isinstance(config, dict) and not hasattr(config, "items"):
        raise ValueError("memory_budget needs the model's config (a dict at model.config) to plan its memory")
    if quantize is not None and quantize not in ("int8", "fp8"):
        raise ValueError(f"with memory_budget, quantize must be None, 'int8' or 'fp8' (weight-only), got {quantize!r}")
    fixed = {}
    if quantize is not None:
        fixed["dit_weights"] = quantize
    if offload is not None:
        fixed["offload_prefetch"] = offload_prefetch if offload == "blocks" else None
    if ffn_chunk_frames is not None:
        fixed["ffn_chunk_frames"] = ffn_chunk_frames
    if attention_chunk_frames is not None:
        fixed["attention_chunk_frames"] = attention_chunk_frames
    tactics, plan = fit_dit(memory_budget, dict(config), latent=latent, batch=batch, attention=attention, fixed=fixed)
    kw = tactics.accelerate_kwargs()
    note = (f"memory budget {memory_budget}: chose weights {tactics.dit_weights}, "
            f"offload {'blocks (prefetch %d)' % tactics.offload_prefetch if tactics.offload_prefetch else 'none'}, "
            f"attention_chunk_frames={tactics.attention_chunk_frames}, ffn_chunk_frames={tactics.ffn_chunk_frames}; "
            f"planned step peak {plan.peak_bytes / 1e9:.2f} GB at latent {tuple(latent)} x batch {batch} (planned, not measured)")
    print(f"longcat.accelerate: {note}")
    return kw["quantize"], kw["offload"], kw["offload_prefetch"], kw["ffn_chunk_frames"], kw["attention_chunk_frames"], note


def restore(model: nn.Module) -> nn.Module:
    """Undo ``accelerate``: op table, block forwards, BSA flags, offload hooks, the packed FFN
    weights (``w1``/``w3`` get storage of their own again). Quantized Linear
    layers are turned back into ``nn.Linear`` holding their dequantised weights (the original
    float weights are not kept, so this step is lossy)."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    if state.get("offload") is not None:
        state["offload"].remove()
    for block, (enabled, params) in zip(model.blocks, state["bsa_before"]):
        for attr in ("forward", "_longcat_eager_forward", "_longcat_ops"):
            if attr in vars(block):
                delattr(block, attr)
        block.attn.enable_bsa, block.attn.bsa_params = enabled, params
    if state["kind"] == "longcat":
        model.set_ops(state["ops_before"] or SDPA_OPS)
    for block in model.blocks:
        unpack_ffn(block.ffn)
    if state.get("quantized"):
        _dequantize_linears(model)
    setattr(model, _STATE_ATTR, None)
    return model


def _dequantize_linears(model: nn.Module) -> None:
    """Replace every QuantizedLinear by an nn.Linear holding its dequantised weight."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "QuantizedLinear":
            continue
        bias = module.bias
        lin = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
        lin.weight = nn.Parameter(module.dequantized_weight(dtype), requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)


def acceleration_report(model: nn.Module) -> Optional[AccelerationReport]:
    """What ``accelerate`` replaced in ``model`` (None if it is not accelerated). The BSA block
    count is read from the blocks at call time: upstream's demo calls ``enable_bsa()`` after
    loading, and ``enable_bsa()``/``disable_bsa()`` keep working after ``accelerate``."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return None
    return replace(state["report"], bsa_blocks=sum(bool(b.attn.enable_bsa) for b in model.blocks))
