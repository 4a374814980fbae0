"""Loading and saving diffusers-style checkpoint folders of the DiT.

A checkpoint folder holds ``config.json`` (the constructor keys; diffusers' ``_class_name`` and
other ``_``-prefixed keys are ignored) and the weights as one ``*.safetensors`` file or as shards
listed by a ``*.safetensors.index.json``. Loading builds the model on the meta device, validates
every name, shape and shard before touching a parameter, then assigns the tensors read from the
memory-mapped shards, so there is never a second copy of the weights and a failed load never
returns a half-loaded model.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Dict, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# One definition of the checkpoint error and of the atomic-write helpers, shared with the
# quantized checkpoints (longcat may import quant; not the reverse).
from longcat.quant.checkpoint import CheckpointError, parse_size, remove_quietly, temporary_name, write_json_atomic

__all__ = ["CheckpointError", "read_config", "find_weight_files", "load_pretrained", "save_pretrained", "parse_size"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"


def read_config(folder: str) -> dict:
    """The model config of a checkpoint folder, without diffusers' private keys."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder!r} has no {CONFIG_NAME}: a checkpoint folder needs the model config")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def find_weight_files(folder: str) -> Dict[str, str]:
    """Map each tensor name to the shard file that holds it (from the index), or return
    ``{"*": file}`` for a single-file checkpoint."""
    names = sorted(os.listdir(folder))
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if INDEX_NAME in indexes:
        indexes = [INDEX_NAME]
    if len(indexes) > 1:
        raise CheckpointError(f"{folder!r} holds several weight indexes {indexes}; keep one")
    if indexes:
        index_path = os.path.join(folder, indexes[0])
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path} is not a safetensors index with a weight_map: {e}") from None
        return {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
    files = [n for n in names if n.endswith(".safetensors")]
    if WEIGHTS_NAME in files:
        files = [WEIGHTS_NAME]
    if len(files) != 1:
        raise CheckpointError(
            f"{folder!r} must hold one .safetensors file or a .safetensors.index.json with shards; found {files or 'none'}"
        )
    return {"*": os.path.join(folder, files[0])}


def _open_shard(path: str, device: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"missing shard {os.path.basename(path)!r} (listed in the index, not in the folder)")
    try:
        return safe_open(path, framework="pt", device=device)
    except Exception as e:  # safetensors raises its own error types for bad headers / sizes
        raise CheckpointError(f"shard {os.path.basename(path)!r} is truncated or corrupted: {e}") from None


def _list_problems(label: str, names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    return f"{label}: {shown}"


def load_pretrained(cls, path: str, dtype: Optional[torch.dtype] = None, device="cpu", config: Optional[dict] = None):
    """Build ``cls`` from a checkpoint folder (or a single .safetensors file plus ``config``).

    dtype: cast floating-point tensors to it (default: keep the stored dtypes).
    device: where the parameters live ("cpu", "cuda", ...); tensors are read straight there.
    """
    if os.path.isdir(path):
        cfg = read_config(path) if config is None else dict(config)
        files = find_weight_files(path)
    elif os.path.isfile(path) and path.endswith(".safetensors"):
        if config is None:
            raise CheckpointError("loading a single .safetensors file needs config=<model config dict>")
        cfg, files = dict(config), {"*": path}
    else:
        raise CheckpointError(f"{path!r} is neither a checkpoint folder nor a .safetensors file")

    from .model import CONFIG_DEFAULTS

    unknown = sorted(set(cfg) - set(CONFIG_DEFAULTS))
    if unknown:
        warnings.warn(f"ignoring config keys this implementation does not use: {unknown}", stacklevel=2)
        cfg = {k: v for k, v in cfg.items() if k in CONFIG_DEFAULTS}
    with torch.device("meta"):
        model = cls(**cfg)
    expected = model.state_dict()

    device = str(torch.device(device))
    shard_paths = sorted(set(files.values()))
    handles = {p: _open_shard(p, device) for p in shard_paths}
    stored: Dict[str, str] = {}
    for p, h in handles.items():
        for name in h.keys():
            if files.get("*") is None and files.get(name) != p:
                continue  # a tensor the index assigns to another shard
            stored[name] = p
    if "*" not in files:
        listed_missing = [n for n, p in files.items() if n not in stored]
        if listed_missing:
            raise CheckpointError(_list_problems("the index lists tensors its shards do not hold", listed_missing))

    missing = set(expected) - set(stored)
    unexpected = set(stored) - set(expected)
    problems = []
    if missing:
        problems.append(_list_problems("missing tensors", missing))
    if unexpected:
        problems.append(_list_problems("unexpected tensors", unexpected))
    for name, p in stored.items():
        if name in expected:
            shape = tuple(handles[p].get_slice(name).get_shape())
            if shape != tuple(expected[name].shape):
                problems.append(f"{name}: checkpoint shape {shape} != model shape {tuple(expected[name].shape)}")
    if problems:
        raise CheckpointError("checkpoint does not match the model config:\n  " + "\n  ".join(problems[:20]))

    state = {}
    for name, p in stored.items():
        try:
            t = handles[p].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read {name!r} from {os.path.basename(p)!r} (truncated or corrupted): {e}") from None
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[name] = t
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _atomic_save(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    tmp = temporary_name(path)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def save_pretrained(model, path: str, max_shard_size="5GB") -> None:
    """Write ``config.json`` and the weights (one file, or shards plus an index). Each file is
    written under a temporary name and renamed into place."""
    limit = parse_size(max_shard_size)
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    if current or not shards:
        shards.append(current)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        _atomic_save(shards[0], os.path.join(path, WEIGHTS_NAME), metadata)
        stale_index = os.path.join(path, INDEX_NAME)
        if os.path.exists(stale_index):
            os.remove(stale_index)
    else:
        weight_map = {}
        n = len(shards)
        for i, shard in enumerate(shards, 1):
            fname = f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
            _atomic_save(shard, os.path.join(path, fname), metadata)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        write_json_atomic({"metadata": {"total_size": total}, "weight_map": weight_map}, os.path.join(path, INDEX_NAME))
    config = {"_class_name": "LongCatVideoTransformer3DModel", **model.config}
    config["patch_size"] = list(config["patch_size"])
    write_json_atomic(config, os.path.join(path, CONFIG_NAME))
