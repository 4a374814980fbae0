"""``longcat-bench pipeline``: the whole LongCat-Video pipeline phase by phase, with random weights.

Builds the UMT5 text encoder (transformers), the Wan 2.1 VAE (diffusers) and the DiT, applies the
tactics that ``longcat.pipeline_plan.fit_pipeline`` chooses for a memory budget (or none: all
resident), then runs text encoding, VAE encode (refinement stage), the denoising steps and VAE
decode, each with its measured peak (torch allocator and NVML on a GPU), its planned peak and its
time. On a GPU a budget is enforced with ``torch.cuda.set_per_process_memory_fraction`` once the
components are built, so "fits" means it ran. Without a GPU the same phases run on small configs.
"""
from __future__ import annotations

import gc
import math
import time
from typing import Callable, List, Optional

import torch

__all__ = ["SMALL_TEXT_ENCODER", "SMALL_VAE", "run_pipeline", "pipeline_packages"]

# CPU stand-ins with the real architectures at toy widths (d_model matches the tiny DiT's captions).
SMALL_TEXT_ENCODER = dict(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                          relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
SMALL_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True])


def pipeline_packages() -> Optional[str]:
    """None when transformers and diffusers import, else what to install."""
    import importlib.util

    missing = [p for p in ("transformers", "diffusers") if importlib.util.find_spec(p) is None]
    return None if not missing else f"{' and '.join(missing)} missing: pip install 'longcat-accel[pipeline]'"


@torch.no_grad()
def _randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1), 1-D parameters: norms 1, biases 0."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            std = 1.0 if "shared" in name or "embed" in name else math.prod(p.shape[1:]) ** -0.5
            p.copy_(torch.randn(p.shape, generator=gen, device=gen.device, dtype=torch.float32).to(p.dtype) * std)
        else:
            p.fill_(1.0 if ("norm" in name or "gamma" in name or name.endswith("scale")) else 0.0)


def build_text_encoder(cfg: dict, device, dtype, seed: int):
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**cfg))
    model.to_empty(device=device)
    _randomize(model, torch.Generator(device=device).manual_seed(seed))
    return model.to(dtype).eval()


def build_vae(cfg: dict, device, dtype, seed: int):
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        vae = AutoencoderKLWan(**cfg)
    vae.to_empty(device=device)
    _randomize(vae, torch.Generator(device=device).manual_seed(seed))
    return vae.to(dtype).eval()


class RandomTokenizer:
    """Token ids drawn at random (no vocabulary files are needed to measure memory and time)."""

    def __init__(self, vocab_size: int, seed: int):
        self.vocab_size, self.gen = vocab_size, torch.Generator().manual_seed(seed)

    def __call__(self, prompts, padding, max_length, truncation, add_special_tokens, return_attention_mask, return_tensors):
        ids = torch.randint(1, self.vocab_size, (len(prompts), max_length), generator=self.gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _measure(name: str, device, fn: Callable, phase, records: List[dict], progress=None) -> object:
    """Run one phase: its time, its peak (torch allocator and NVML on a GPU; on the CPU the peak
    of the tensors it creates, comparable with the planned activations) and the planned figures."""
    import contextlib

    from .memory import LiveTensorBytes, track_memory

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    live = LiveTensorBytes() if device.type == "cpu" else contextlib.nullcontext()
    with track_memory(device) as mem, live:
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    rep = mem.report
    records.append(dict(name="pipeline_phase", phase=name, time_s=seconds, planned_peak_bytes=int(phase.peak_bytes),
                        planned_activation_bytes=int(phase.activation_bytes),
                        measured_peak_bytes=rep.torch_peak_allocated_bytes if device.type == "cuda" else None,
                        live_tensor_peak_bytes=live.peak if device.type == "cpu" else None,
                        nvml_peak_used_bytes=rep.nvml_peak_used_bytes, cpu_peak_rss_bytes=rep.cpu_peak_rss_bytes,
                        memory=rep.as_dict(), status="ok"))
    if progress is not None:
        progress.update(1, note=name)
    return out


def run_pipeline(stage: str = "refine", *, budget: Optional[str] = None, device=None, small: Optional[bool] = None,
                 latent=None, steps: int = 1, text_len: Optional[int] = None, seed: int = 0, progress=None,
                 tactics=None, fit_latent=None, label: Optional[str] = None, keep_output: bool = False) -> dict:
    """Run the pipeline's phases once; returns {"config", "tactics", "plan", "records", ...}
    (with ``keep_output``, also "output": the decoded video, on the CPU).

    small: toy widths (default: on the CPU); latent: the latent grid (T, H, W) run (default: the
    stage's, or a tiny one when small); tactics: a ``PipelineTactics`` (default: fitted to
    ``budget`` for the latent grid ``fit_latent``, default ``latent``, or all resident without a
    budget). Fitting for the stage's full grid and running fewer frames measures the real
    recipe in less time; the planned figures are always those of the grid that runs."""
    import longcat
    from longcat.pipeline import place_text_encoder
    from longcat.pipeline_memory import WanVAETiler
    from longcat.pipeline_plan import STAGES, PipelineTactics, fit_pipeline, parse_memory_size, plan_pipeline

    from .models import build_random_model

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    small = device.type != "cuda" if small is None else small
    te_cfg = SMALL_TEXT_ENCODER if small else None
    vae_cfg = SMALL_VAE if small else None
    dit = "tiny" if small else "longcat-video"
    text_len = text_len or (16 if small else 512)
    latent = tuple(latent or ((5, 8, 8) if small else STAGES[stage]["latent"]))
    batch = STAGES[stage]["batch"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    plan_kw = dict(latent=latent, dit=dit, text_encoder=te_cfg, vae=vae_cfg, text_len=text_len)
    if tactics is None:
        fit_kw = dict(plan_kw, latent=tuple(fit_latent or latent))
        tactics = fit_pipeline(budget, stage, **fit_kw).tactics if budget else PipelineTactics()
    plan = plan_pipeline(stage, tactics, **plan_kw)
    planned = {p.name: p for p in plan.phases}

    from longcat.pipeline_plan import UMT5_XXL_CONFIG, WAN21_VAE_CONFIG

    te_cfg = dict(te_cfg or UMT5_XXL_CONFIG)
    vae_cfg = dict(vae_cfg or WAN21_VAE_CONFIG)
    gc.collect()  # the previous run's components
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # Built (fast random init) on the device; a CPU text encoder then runs in float32, which CPUs
    # multiply faster than bfloat16.
    on_cpu = tactics.text_encoder == "cpu"
    text_encoder = place_text_encoder(build_text_encoder(te_cfg, device, torch.float32 if on_cpu else dtype, seed),
                                      tactics.text_encoder, device)
    vae = build_vae(vae_cfg, device, dtype, seed + 1)
    model = build_random_model(dit, dtype=dtype, device=device, seed=seed + 2)
    kw = tactics.accelerate_kwargs()
    longcat.accelerate(model, attention="auto", fused=True, bsa=stage == "refine", **kw)
    gc.collect()
    fraction = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        if budget:
            total = torch.cuda.get_device_properties(device).total_memory
            fraction = min(1.0, parse_memory_size(budget) / total)
            torch.cuda.set_per_process_memory_fraction(fraction, device)

    records: List[dict] = []
    gen = torch.Generator(device="cpu").manual_seed(seed + 3)
    T, H, W = latent
    tokenizer = RandomTokenizer(te_cfg["vocab_size"], seed + 4)
    try:
        def encode_text():  # as the pipeline calls it: inputs on the device; the placement's hooks do the rest
            tokens = tokenizer(["a prompt"] * batch, padding="max_length", max_length=text_len, truncation=True,
                               add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
            ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
            with torch.no_grad():
                hidden = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            return hidden.unsqueeze(1).to(device, dtype), mask[:, None, None, :]

        emb, mask = _measure("text encoding", device, encode_text, planned["text encoding"], records, progress)
        scale = 8
        if stage == "refine":
            frames = 4 * (T - 1) + 1
            home = "cpu" if tactics.vae_tile else device
            video = (torch.rand(1, 3, frames, H * scale, W * scale, generator=gen) * 2 - 1).to(home, dtype)

            def encode_video():
                if tactics.vae_tile:
                    return WanVAETiler(vae).encode(video, tactics.vae_tile, device=device).float()
                return vae.encode(video).latent_dist.mode().float()

            latents = _measure("vae encode", device, encode_video, planned["vae encode"], records, progress)
            del video
            noise = torch.randn(latents.shape, generator=gen).to(device)
            latents = 0.5 * latents + 0.5 * noise  # the refinement starts from a partly noised stage-1 video
        else:
            latents = torch.randn(batch, vae_cfg["z_dim"], T, H, W, generator=gen).to(device)

        for s in range(steps):
            t = torch.full((latents.shape[0],), 1000.0 * (1 - s / max(1, steps)), device=device)

            def denoise():
                pred = model(latents, t, emb, mask)
                return latents - pred / max(1, steps)  # Euler step of the flow

            latents = _measure("denoising step", device, denoise, planned["denoising step"], records, progress)

        def decode_video():
            if tactics.vae_tile:
                return WanVAETiler(vae).decode(latents.to(dtype), tactics.vae_tile)
            return vae.decode(latents.to(dtype)).sample

        video_out = _measure("vae decode", device, decode_video, planned["vae decode"], records, progress)
        finite = bool(torch.isfinite(video_out).all())
        output = video_out.cpu() if keep_output else None
    except torch.OutOfMemoryError as e:  # the budget did not hold: that phase did not fit
        done = {r["phase"] for r in records}
        phase = next(p for p in planned if p not in done)
        records.append(dict(name="pipeline_phase", phase=phase, planned_peak_bytes=planned[phase].peak_bytes, status="out of memory",
                            reason=str(e).splitlines()[0][:200]))
        finite, output = False, None
    finally:
        if fraction is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    config = label or (f"budget {budget}" if budget else "all resident")
    for r in records:
        r["config"] = config
    result = dict(config=config, tactics=str(tactics), plan=plan.as_dict(), records=records, output_finite=finite,
                  small=small, device=str(device), latent=list(latent), budget=budget, memory_fraction=fraction)
    if keep_output:
        result["output"] = output
    return result
