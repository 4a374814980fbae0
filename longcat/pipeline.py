"""One call for a whole LongCat-Video pipeline: ``longcat.accelerate_pipeline(pipe, memory_budget="8GB")``.

``pipe`` is any object holding the pipeline's components the way upstream's
``LongCatVideoPipeline`` does: ``dit`` (the DiT, upstream's class or ours), ``text_encoder`` (the
UMT5 encoder, a Hugging Face module) and ``vae`` (diffusers' ``AutoencoderKLWan``, or upstream's
copy of it). The tactics ``fit_pipeline`` chooses for the budget (or the ones given) are applied
in place, so the pipeline's own code runs unchanged:

- the DiT: ``longcat.accelerate`` with the tactics' weights format, block offload and chunking;
- the text encoder (``place_text_encoder``): 8-bit weights, kept on the CPU and brought to the GPU
  only while it encodes ("offload"), streamed to the GPU layer by layer ("offload-blocks"), or run
  on the CPU with its inputs and outputs moved across ("cpu");
- the VAE: ``vae.encode`` and ``vae.decode`` replaced by ``WanVAETiler``'s tiled versions, which
  return the same objects (``latent_dist``, ``sample``) and the same values as the whole-frame ones.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from .accelerate import accelerate
from .offload import BlockOffloader, first_tensor_device
from .pipeline_memory import WanVAETiler, offload_to_cpu
from .pipeline_plan import UMT5_INT8_EXCLUDE, PipelinePlan, PipelineTactics, fit_pipeline, plan_pipeline

__all__ = ["accelerate_pipeline", "place_text_encoder"]


def accelerate_pipeline(
    pipe,
    memory_budget: Union[None, int, str] = None,
    stage: str = "refine",
    *,
    tactics: Optional[PipelineTactics] = None,
    device=None,
    plan_kwargs: Optional[dict] = None,
    verbose: bool = True,
    **accelerate_kwargs,
) -> PipelinePlan:
    """Fit ``memory_budget`` (e.g. "8GB"; or apply ``tactics``) to ``pipe`` and return the plan.

    stage: "refine" (720p refinement) or "base" (480p); plan_kwargs: the rest of
    ``plan_pipeline``'s arguments (latent, temporal_doubling, batch, ...). device: where the
    pipeline computes (default: CUDA when present). accelerate_kwargs: more ``longcat.accelerate``
    arguments for the DiT (attention, bsa, fused, compile, ...), not those the tactics set.
    Prints the choice and its planned peak unless ``verbose=False``."""
    if (memory_budget is None) == (tactics is None):
        raise ValueError("give accelerate_pipeline either memory_budget or tactics (one of them)")
    if tactics is not None and not isinstance(tactics, PipelineTactics):
        raise TypeError(f"tactics must be a PipelineTactics, got {type(tactics).__name__}")
    missing = [name for name in ("dit", "text_encoder", "vae") if not isinstance(getattr(pipe, name, None), nn.Module)]
    if missing:
        raise TypeError(f"pipe needs the modules dit, text_encoder and vae (as LongCatVideoPipeline has); missing {missing}")
    plan = (fit_pipeline(memory_budget, stage, **(plan_kwargs or {})) if tactics is None
            else plan_pipeline(stage, tactics, **(plan_kwargs or {})))
    dit_kwargs = plan.tactics.accelerate_kwargs()
    clash = sorted(set(dit_kwargs) & set(accelerate_kwargs))
    if clash:
        raise ValueError(f"{clash} are set by the pipeline's tactics; fix them through tactics (or fit_pipeline's fixed=)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae_tiler = WanVAETiler(pipe.vae) if plan.tactics.vae_tile else None  # refuses a VAE it cannot tile first

    accelerate(pipe.dit, **dit_kwargs, **accelerate_kwargs)
    place_text_encoder(pipe.text_encoder, plan.tactics.text_encoder, device)
    if vae_tiler is not None:
        _tile_vae(pipe.vae, vae_tiler, plan.tactics.vae_tile)
    if verbose:
        print(f"accelerate_pipeline: {plan.tactics}; planned peak {plan.peak_bytes / 1e9:.2f} GB (planned, not measured)")
    return plan


def _to(obj, device):
    """Tensors in ``obj`` (a tensor, a tuple/list, a dict or a Hugging Face ModelOutput) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):  # ModelOutput is an OrderedDict: set its items in place
        for key in list(obj.keys()):
            obj[key] = _to(obj[key], device)
        return obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def place_text_encoder(encoder: nn.Module, tactic: str, device) -> nn.Module:
    """Put a Hugging Face text encoder where ``tactic`` (``PipelineTactics.text_encoder``) says,
    with hooks so that calling it with inputs on ``device`` works as before and returns its
    outputs on ``device``. "offload-blocks" needs a T5-style encoder (``encoder.block``,
    ``encoder.embed_tokens``: UMT5 has them)."""
    from .pipeline_plan import TEXT_ENCODER_TACTICS

    if tactic not in TEXT_ENCODER_TACTICS:
        raise ValueError(f"text encoder tactic must be one of {TEXT_ENCODER_TACTICS}, got {tactic!r}")
    device = torch.device(device)
    stack = getattr(encoder, "encoder", None)
    if tactic == "offload-blocks" and not (isinstance(getattr(stack, "block", None), nn.ModuleList)
                                           and isinstance(getattr(stack, "embed_tokens", None), nn.Module)):
        raise TypeError("text_encoder 'offload-blocks' needs a T5-style encoder (encoder.block and encoder.embed_tokens)")
    if tactic.endswith("int8"):
        from .quant import quantize

        quantize(encoder, "int8", exclude=UMT5_INT8_EXCLUDE)
    if tactic in ("gpu", "gpu-int8"):
        encoder.to(device)
    elif tactic == "offload-blocks":
        encoder.to("cpu")
        for module in stack.children():  # the final norm (and dropout) live on the device
            if module is not stack.block and module is not stack.embed_tokens:
                module.to(device)
        # The embedding table (2.1 GB for UMT5-XXL) looks up on the CPU; its output goes to the device.
        stack.embed_tokens.register_forward_pre_hook(lambda module, args: _to(tuple(args), "cpu"))
        stack.embed_tokens.register_forward_hook(lambda module, args, out: out.to(device))
        encoder._longcat_block_offloader = BlockOffloader(stack.block, prefetch=1)
    elif tactic.startswith("offload"):  # on the GPU only while it encodes
        offload_to_cpu(encoder)
        encoder.register_forward_pre_hook(lambda module, args: module.to(device) and None)
        encoder.register_forward_hook(lambda module, args, out: offload_to_cpu(module) and None)
    else:  # "cpu": inputs come to the CPU, outputs go back to where the inputs were
        encoder.to("cpu")
        origin = []

        def inputs_to_cpu(module, args, kwargs):
            origin[:] = [first_tensor_device(args, kwargs)]
            return _to(tuple(args), "cpu"), _to(dict(kwargs), "cpu")

        def outputs_back(module, args, out):
            return _to(out, origin[0]) if origin and origin[0] is not None else out

        encoder.register_forward_pre_hook(inputs_to_cpu, with_kwargs=True)
        encoder.register_forward_hook(outputs_back)
    return encoder


def _tile_vae(vae: nn.Module, tiler: WanVAETiler, tile: int) -> None:
    """Replace ``vae.encode`` / ``vae.decode`` (on this instance) with the tiled, equal ones."""
    from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput

    def encode(x: torch.Tensor, return_dict: bool = True):
        dist = DiagonalGaussianDistribution(tiler.encode_moments(x, tile))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(z: torch.Tensor, return_dict: bool = True):
        sample = tiler.decode(z, tile)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    vae.encode, vae.decode = encode, decode
