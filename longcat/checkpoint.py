"""Loading and saving diffusers-style checkpoint folders of the DiT.

A checkpoint folder holds ``config.json`` (the constructor keys; diffusers' ``_class_name`` and
other ``_``-prefixed keys are ignored) and the weights as one ``*.safetensors`` file or as shards
listed by a ``*.safetensors.index.json``. Loading builds the model on the meta device, validates
every name, shape and shard before touching a parameter, then assigns the tensors read from the
memory-mapped shards, so there is never a second copy of the weights and a failed load never
returns a half-loaded model.

``save_pretrained`` always writes shards plus ``diffusion_pytorch_model.safetensors.index.json``
(diffusers loads that layout too). The index is the commit: the shards get names no earlier save
used (a random save id) and are written under temporary names, fsynced, renamed and the folder
fsynced before the index is atomically replaced; ``config.json`` is written after it, and the files
of the previous checkpoint are removed last. A save interrupted anywhere leaves the previous
checkpoint or the new one, never a mixture. The index also records the config and each shard's
size and CRC-32 (see ``longcat.quant.checkpoint`` for the hash and its speed); loading verifies
them unless ``verify=False``, and uses the recorded config when ``config.json`` differs from it (a
save interrupted before ``config.json`` was written, or a hand edit: a warning names the keys).
Checkpoints without checksums (written before they were recorded, or upstream's) load unverified,
with one warning. Shards must lie in the folder: absolute paths, ``..`` and symbolic links leading
out of it are refused.
"""
from __future__ import annotations

import json
import os
import re
import uuid
import warnings
from typing import Dict, NamedTuple, Optional

import torch
from safetensors import safe_open

# One definition of the checkpoint error and of the crash-safe write, path and checksum helpers,
# shared with the quantized checkpoints (longcat may import quant; not the reverse).
from longcat.quant.checkpoint import (
    CheckpointError,
    commit_manifest,
    parse_size,
    remove_unreferenced,
    shard_path,
    verify_shards,
    write_json_atomic,
    write_shards,
)

__all__ = ["CheckpointError", "read_config", "find_weight_files", "load_pretrained", "save_pretrained", "parse_size"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
SHARD_PATTERN = re.compile(r"diffusion_pytorch_model-[0-9a-f]{12}-\d{5}-of-\d{5}\.safetensors")
INDEX_FORMAT = "longcat-dit"  # marks an index written by save_pretrained (config and checksums recorded)
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


class WeightFiles(NamedTuple):
    """Where a folder's tensors are: ``files`` maps each tensor name to its shard path (``{"*":
    path}`` for a single file); ``checksums`` and ``config`` are those the index recorded at save
    (None when it recorded none)."""
    files: Dict[str, str]
    checksums: Optional[dict] = None
    config: Optional[dict] = None


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


def _read_index(index_path: str) -> dict:
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index_path} is not valid JSON: {e}") from None
    if not isinstance(index, dict) or "weight_map" not in index:
        raise CheckpointError(f"{index_path} is not a safetensors index: it needs a 'weight_map' object")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index_path}: 'weight_map' must be a JSON object mapping tensor names to shard file "
                              f"names, got a {type(weight_map).__name__}")
    metadata = index.get("metadata")
    return {"weight_map": weight_map, "metadata": metadata if isinstance(metadata, dict) else {}}


def find_weight_files(folder: str) -> WeightFiles:
    """Where the folder's tensors are (from the index, or its single .safetensors file), with the
    checksums and config the index recorded; shards leaving the folder are refused."""
    names = sorted(os.listdir(folder))
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if INDEX_NAME in indexes:
        indexes = [INDEX_NAME]
    if len(indexes) > 1:
        raise CheckpointError(f"{folder!r} holds several weight indexes {indexes}; keep one")
    if indexes:
        index_path = os.path.join(folder, indexes[0])
        index = _read_index(index_path)
        files = {name: shard_path(folder, shard, index_path) for name, shard in index["weight_map"].items()}
        meta = index["metadata"]
        ours = meta.get("format") == INDEX_FORMAT
        return WeightFiles(files, meta.get("checksums") if ours else None,
                           meta.get("config") if ours and isinstance(meta.get("config"), dict) else None)
    files = [n for n in names if n.endswith(".safetensors")]
    if WEIGHTS_NAME in files:
        files = [WEIGHTS_NAME]
    if len(files) != 1:
        raise CheckpointError(
            f"{folder!r} must hold one .safetensors file or a .safetensors.index.json with shards; found {files or 'none'}"
        )
    return WeightFiles({"*": shard_path(folder, files[0], folder)})


def _check_device(device) -> str:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch.device or a device string such as 'cpu' or 'cuda:0', got {device!r} ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available on this machine (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'no'}); load with device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)


def _check_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    raise TypeError(f"dtype must be None, a floating-point torch.dtype or one of {sorted(DTYPE_NAMES)}, got {dtype!r}")


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


def _model_keys(cfg: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if not k.startswith("_")}


def load_pretrained(cls, path: str, dtype: Optional[torch.dtype] = None, device="cpu", config: Optional[dict] = None,
                    verify: bool = True):
    """Build ``cls`` from a checkpoint folder (or a single .safetensors file plus ``config``).

    dtype: cast floating-point tensors to it (default: keep the stored dtypes); a torch.dtype or a
        name such as "bfloat16".
    device: where the parameters live ("cpu", "cuda", ...); tensors are read straight there.
    config: the model config (default: the folder's, see the module docstring).
    verify: check every shard's size and CRC-32 against those recorded at save (reads each shard
        once more); ``verify=False`` skips it for trusted fast loads.
    """
    path = os.fspath(path)
    dtype = _check_dtype(dtype)
    device = _check_device(device)
    if os.path.isdir(path):
        weights = find_weight_files(path)
        cfg = read_config(path) if config is None else dict(config)
        if config is None and weights.config is not None and _model_keys(cfg) != _model_keys(weights.config):
            saved = _model_keys(weights.config)
            keys = sorted(k for k in set(saved) | set(_model_keys(cfg)) if saved.get(k) != _model_keys(cfg).get(k))
            warnings.warn(f"{path}: {CONFIG_NAME} differs from the config saved with the weights in {INDEX_NAME} "
                          f"(keys {keys}): a save interrupted before writing {CONFIG_NAME}, or a hand edit; using the "
                          "saved config (pass config= to choose another)", stacklevel=3)
            cfg = dict(weights.config)
        if verify:
            shards = sorted({os.path.basename(p) for p in weights.files.values()})
            verify_shards(path, shards, weights.checksums, "checkpoint")
        files = weights.files
    elif os.path.isfile(path) and path.endswith(".safetensors"):
        if config is None:
            raise CheckpointError("loading a single .safetensors file needs config=<model config dict>")
        cfg, files = dict(config), {"*": path}
        if verify:
            verify_shards(os.path.dirname(path) or ".", [os.path.basename(path)], None, "weights file")
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


def save_pretrained(model, path: str, max_shard_size="5GB") -> None:
    """Write the weights as shards plus an index recording the config and each shard's size and
    CRC-32, then ``config.json``; crash-consistent (see the module docstring)."""
    limit = parse_size(max_shard_size)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach() for k, v in model.state_dict().items()}
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
    n, save_id = len(shards), uuid.uuid4().hex[:12]
    names = [f"diffusion_pytorch_model-{save_id}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    previous = _files_of_previous_save(path)
    checksums = write_shards(path, shards, names)

    config = {"_class_name": "LongCatVideoTransformer3DModel", **model.config}
    config["patch_size"] = list(config["patch_size"])
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values()), "format": INDEX_FORMAT,
                     "config": _model_keys(config), "checksums": checksums},
        "weight_map": {k: fname for shard, fname in zip(shards, names) for k in shard},
    }
    commit_manifest(index, os.path.join(path, INDEX_NAME), names)
    write_json_atomic(config, os.path.join(path, CONFIG_NAME))
    orphans = {f for f in os.listdir(path) if SHARD_PATTERN.fullmatch(f)}  # of interrupted saves
    remove_unreferenced(path, previous | orphans, keep=names)


def _files_of_previous_save(folder: str) -> set:
    """The weight files of the checkpoint now in ``folder`` (removed once the new one is committed):
    the shards its index lists, or its single weights file."""
    index_path = os.path.join(folder, INDEX_NAME)
    if os.path.isfile(index_path):
        try:
            return set(_read_index(index_path)["weight_map"].values())
        except CheckpointError:
            return set()  # not readable as an index: leave it and its files alone
    return {WEIGHTS_NAME} if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)) else set()
