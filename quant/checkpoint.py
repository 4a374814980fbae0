"""Quantized checkpoints: sharded safetensors, an index, and ``quantization_config.json``.

Layout written by ``save_quantized(model, folder)`` (format version 2)::

    folder/longcat-quant-<save id>-00001-of-0000N.safetensors ...   tensors in state-dict order,
                                                                    <= max_shard_size each
    folder/quantization_config.json     format name + version, config, skip list, per-module spec,
                                        the weight map {name: shard} and each shard's size and CRC-32

Crash consistency: ``quantization_config.json`` is the commit. The shards of a save get names no
earlier save used (a random save id); each is written under a temporary name, fsynced and renamed,
then the folder is fsynced; only then is the new ``quantization_config.json`` written (temporary
name, fsync, atomic rename, folder fsync). A save interrupted at any point leaves the previous
checkpoint loadable and untouched (plus unreferenced shards that the next save removes); after the
commit, the shards the previous checkpoint of this format listed are removed. Nothing else in the
folder is ever removed or overwritten: a folder whose ``quantization_config.json`` this format did
not write is refused.

Integrity: the CRC-32 of every shard file is recorded at save and checked on load (``verify=True``,
the default). zlib's CRC-32 detects any flipped bit, burst and truncation (it is not a defence
against deliberate tampering). Measured on a shared 2-core x86 CPU (load average ~14):
``file_checksum`` 0.63-0.68 GB/s on a page-cached 1 GiB file, ``zlib.crc32`` 1.1 GB/s in memory
(3.5 GB/s with the CPU less loaded); so verification costs up to ~1.5 s per GB there (about 40 s
for the 27 GB bf16 model), less on an idle server CPU. ``verify=False`` skips it for trusted fast
loads. Checkpoints of format version 1
and upstream's carry no checksums: they load unverified, with one warning.

``load_quantized(folder, model)`` reads this format and upstream LongCat-Video's ``base_model_int8``
format (``<name>.weight_int8`` int8 [out, in], ``<name>.weight_scale`` float32 [out], bf16 bias,
``quantized_model.safetensors.index.json``); both map onto ``QuantizedLinear``. Because
``longcat.quant`` does not import the model, the caller provides it: either a callable that builds
it (called under ``torch.device("meta")``, so nothing is allocated) or an ``nn.Module`` already built
on the meta device, e.g. ``load_quantized(path, lambda: LongCatVideoTransformer3DModel(**config))``.
Everything is validated (format and version, every shard present and complete, headers parse,
tensor names, shapes and dtypes) before any tensor data is read; tensors are then assigned shard by
shard, so no full-precision copy of a quantized layer ever exists.
"""
from __future__ import annotations

import json
import os
import re
import struct
import uuid
from collections import OrderedDict
import warnings
import zlib
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .config import DEFAULT_SKIP, LayerSpec, QuantConfig, config_from_dict
from .linear import QuantizedLinear
from .quantize import CONFIG_ATTR, quantized_layers

__all__ = [
    "save_quantized",
    "load_quantized",
    "read_quantization_config",
    "CheckpointError",
    "parse_size",
    "write_json_atomic",
    "temporary_name",
    "remove_quietly",
    "file_checksum",
    "fsync_folder",
    "commit_manifest",
    "write_shards",
    "shard_path",
    "verify_shards",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]

FORMAT_NAME = "longcat-quant"
FORMAT_VERSION = 2  # 2: weight map and shard checksums in the config file, shard names of our own
CONFIG_FILE = "quantization_config.json"
V1_INDEX_FILE = "model.safetensors.index.json"  # where format version 1 kept its weight map
SHARD_PATTERN = re.compile(r"longcat-quant-[0-9a-f]{12}-\d{5}-of-\d{5}\.safetensors")
_CHUNK = 16 * 2**20
UPSTREAM_INDEX_FILE = "quantized_model.safetensors.index.json"
UPSTREAM_METHOD = "int8_per_channel_symmetric"

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked (wrong format, missing or damaged files, mismatch)."""


# ----------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------

def parse_size(size, name: str = "max_shard_size") -> int:
    """Bytes from a positive number or a string such as '4GB' (10^9), '16GiB' (2^30), '500MB',
    '64KiB' (shard limits, memory budgets); a ValueError naming ``name`` otherwise."""
    if isinstance(size, (int, float)) and not isinstance(size, bool) and size > 0:
        return int(size)
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
        if m:
            unit = (m.group(2) or "B").upper()
            mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
            value = int(float(m.group(1)) * mult)
            if value > 0:
                return value
    raise ValueError(f"{name} must be a positive number of bytes or a string like '8GB' or '16GiB', got {size!r}")


def _standalone(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses tensors that share storage; a view of a larger buffer gets its own copy.
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.contiguous().clone()
    return t


def write_json_atomic(obj, final_path: str) -> None:
    """Write JSON under a temporary name in the same folder, fsync, then rename into place."""
    tmp = temporary_name(final_path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final_path)
    except BaseException:
        remove_quietly(tmp)
        raise


def temporary_name(final_path: str) -> str:
    folder, base = os.path.split(final_path)
    return os.path.join(folder, f".{base}.tmp-{uuid.uuid4().hex[:12]}")


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: str) -> None:
    """Make the folder's entries (renames, new files) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_checksum(path: str) -> str:
    """CRC-32 of a file's bytes, as 8 hex digits."""
    crc, buf = 0, bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def write_shards(folder: str, shards: Sequence[Dict[str, torch.Tensor]], names: Sequence[str]) -> Dict[str, dict]:
    """Write each shard under a temporary name, fsync it, record its size and CRC-32, rename it to
    its final name (which must not exist: nothing is overwritten), then fsync the folder. Returns
    ``{name: {"size", "crc32"}}``. On any failure every file written here is removed."""
    written: List[str] = []
    records: Dict[str, dict] = {}
    try:
        for tensors, name in zip(shards, names):
            final = os.path.join(folder, name)
            if os.path.lexists(final):
                raise FileExistsError(f"{final} exists; a save never overwrites a shard")
            tmp = temporary_name(final)
            written.append(tmp)
            save_file({k: _standalone(t) for k, t in tensors.items()}, tmp, metadata={"format": "pt"})
            _fsync_file(tmp)
            records[name] = {"size": os.path.getsize(tmp), "crc32": file_checksum(tmp)}
            os.replace(tmp, final)
            written[-1] = final
        fsync_folder(folder)
    except BaseException:
        for path in written:
            remove_quietly(path)
        raise
    return records


def remove_unreferenced(folder: str, names: Iterable[str], keep: Iterable[str]) -> None:
    """After a commit: remove the plain file names in ``names`` (files this format wrote) not in ``keep``."""
    keep = set(keep)
    for name in set(names) - keep:
        if isinstance(name, str) and name and os.path.basename(name) == name and name not in (".", ".."):
            remove_quietly(os.path.join(folder, name))
    fsync_folder(folder)


def shard_path(folder: str, name, what: str) -> str:
    """The path of shard ``name`` listed by ``what``, refusing names that leave the checkpoint
    folder: absolute paths, ``..`` components, and symbolic links resolving outside it."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{what}: a shard file name must be a non-empty string, got {name!r}")
    if os.path.isabs(name) or re.match(r"[A-Za-z]:[\\/]", name) or name.startswith(("/", "\\")):
        raise CheckpointError(f"{what}: shard {name!r} is an absolute path; shards must lie in the checkpoint folder")
    if ".." in re.split(r"[\\/]", name):
        raise CheckpointError(f"{what}: shard {name!r} leaves the checkpoint folder ('..'); shards must lie in it")
    full = os.path.join(folder, name)
    root, real = os.path.realpath(folder), os.path.realpath(full)
    if os.path.commonpath([root, real]) != root:
        raise CheckpointError(f"{what}: shard {name!r} is a symbolic link to {real}, outside the checkpoint folder; "
                              "copy the file into the folder (e.g. download with huggingface_hub's local_dir=)")
    return full


def verify_shards(folder: str, names: Iterable[str], recorded: Optional[dict], what: str) -> None:
    """Compare each shard's size and CRC-32 with those recorded at save. ``recorded`` None: a
    checkpoint written without checksums, loaded unverified with one warning."""
    if recorded is None:
        warnings.warn(f"{what} {folder} has no shard checksums (written before they were recorded, or by "
                      "another tool): loading it unverified", stacklevel=3)
        return
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{what} {folder}: the recorded shard checksums are not a mapping")
    for name in sorted(set(names)):
        rec = recorded.get(name)
        if not isinstance(rec, dict) or not isinstance(rec.get("size"), int) or not isinstance(rec.get("crc32"), str):
            raise CheckpointError(f"{what} {folder}: no checksum recorded for shard {name!r}")
        full = os.path.join(folder, name)
        if not os.path.isfile(full):
            raise CheckpointError(f"missing shard {name!r} (listed in the index, not in {folder})")
        size = os.path.getsize(full)
        if size != rec["size"]:
            raise CheckpointError(f"shard {name!r} in {folder} has {size} bytes where {rec['size']} were saved "
                                  "(truncated or replaced)")
        crc = file_checksum(full)
        if crc != rec["crc32"]:
            raise CheckpointError(f"shard {name!r} in {folder} is corrupted: CRC-32 {crc}, {rec['crc32']} recorded "
                                  "at save (verify=False skips this check, for files you trust)")


def _module_entries(model: nn.Module) -> "OrderedDict[str, dict]":
    out = OrderedDict()
    for name, m in quantized_layers(model).items():
        entry = m.spec.to_dict()
        entry.update(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)
        out[name] = entry
    return out


def save_quantized(model: nn.Module, path: str, max_shard_size: Union[int, str] = "4GB") -> dict:
    """Save a model quantized with ``longcat.quant.quantize`` to the folder ``path``.

    Returns the index (``{"metadata": {"total_size"}, "weight_map"}``). Tensors on any device are
    copied to the CPU one shard at a time. Refuses meta tensors (nothing to save).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    limit = parse_size(max_shard_size)
    state = model.state_dict()
    meta = [k for k, v in state.items() if v.device.type == "meta"]
    if meta:
        raise ValueError(f"model has {len(meta)} tensors on the meta device (e.g. {meta[:3]}); load or "
                         "quantize real weights before saving")

    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    n = len(shards)
    save_id = uuid.uuid4().hex[:12]
    names = [f"longcat-quant-{save_id}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    os.makedirs(path, exist_ok=True)
    previous = _files_of_previous_save(path)  # refuses a folder holding another format's config
    records = write_shards(path, [{k: state[k] for k in keys} for keys in shards], names)

    config = getattr(model, CONFIG_ATTR, None)
    weight_map = {k: name for keys, name in zip(shards, names) for k in keys}
    total = sum(t.numel() * t.element_size() for t in state.values())
    qconfig = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "quant_method": config.name if isinstance(config, QuantConfig) else "custom",
        "config": config.to_dict() if isinstance(config, QuantConfig) else None,
        "skip": list(config.skip) if isinstance(config, QuantConfig) else list(DEFAULT_SKIP),
        "modules": _module_entries(model),
        "torch_version": torch.__version__,
        "total_size": total,
        "weight_map": weight_map,
        "shards": records,
    }
    commit_manifest(qconfig, os.path.join(path, CONFIG_FILE), names)
    orphans = [f for f in os.listdir(path) if SHARD_PATTERN.fullmatch(f)]  # of interrupted saves
    remove_unreferenced(path, previous | set(orphans), keep=names)
    return {"metadata": {"total_size": total, "format": FORMAT_NAME}, "weight_map": weight_map}


def commit_manifest(manifest: dict, manifest_path: str, shard_names) -> None:
    """The commit of a sharded save: write the manifest (the index or config that maps tensors to
    ``shard_names``, already written beside it) atomically and fsync the folder. If that fails and
    the manifest on disk does not list the new shards, the new shards are removed, so the folder
    holds the previous checkpoint exactly as before."""
    folder = os.path.dirname(manifest_path) or "."
    try:
        write_json_atomic(manifest, manifest_path)
        fsync_folder(folder)
    except BaseException:
        if shard_names and not _lists_shard(manifest_path, shard_names[0]):
            for name in shard_names:
                remove_quietly(os.path.join(folder, name))
        raise


def _lists_shard(manifest_path: str, shard: str) -> bool:
    """Whether the manifest on disk maps some tensor to ``shard`` (that save's commit happened)."""
    try:
        with open(manifest_path, encoding="utf-8") as f:
            return shard in json.load(f).get("weight_map", {}).values()
    except (OSError, ValueError, AttributeError):
        return False


def _files_of_previous_save(path: str) -> set:
    """The files the checkpoint of this format already in ``path`` consists of (removed after the
    new save commits). Refuses a folder whose quantization_config.json this format did not write."""
    if not os.path.lexists(os.path.join(path, CONFIG_FILE)):
        return set()
    try:
        cfg = read_quantization_config(path)
    except CheckpointError as e:
        cfg, reason = None, str(e)
    else:
        reason = f"it is upstream's {UPSTREAM_METHOD} format"
    if cfg is None or cfg["flavour"] != "longcat":
        raise CheckpointError(f"{path} holds a {CONFIG_FILE} that save_quantized did not write ({reason}); nothing "
                              "was written: save into an empty folder or one written by save_quantized")
    if cfg["format_version"] >= 2:
        return set(cfg["weight_map"].values())
    try:
        with open(os.path.join(path, V1_INDEX_FILE), encoding="utf-8") as f:
            listed = json.load(f).get("weight_map", {})
    except (OSError, ValueError, AttributeError):
        listed = {}
    return {V1_INDEX_FILE} | {v for v in (listed.values() if isinstance(listed, dict) else ()) if isinstance(v, str)}


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------

def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} is not valid JSON ({path}): {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} must hold a JSON object ({path})")
    return obj


def read_quantization_config(path: str) -> dict:
    """The checkpoint's quantization_config.json, with its flavour checked: ``{"flavour":
    "longcat"|"upstream", ...}``. Refuses unknown formats and versions."""
    cfg = _read_json(os.path.join(path, CONFIG_FILE), CONFIG_FILE)
    if cfg.get("format") == FORMAT_NAME:
        version = cfg.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise CheckpointError(f"{path}: format version {version!r} of {FORMAT_NAME} is not supported "
                                  f"(this longcat reads versions 1..{FORMAT_VERSION}); upgrade longcat")
        if not isinstance(cfg.get("modules"), dict):
            raise CheckpointError(f"{path}: {CONFIG_FILE} has no 'modules' mapping")
        if version >= 2:
            _check_weight_map(cfg.get("weight_map"), f"{path}: {CONFIG_FILE}")
            if not isinstance(cfg.get("shards"), dict):
                raise CheckpointError(f"{path}: {CONFIG_FILE} has no 'shards' mapping (the shard checksums)")
        return dict(cfg, flavour="longcat")
    if cfg.get("quantization_method") == UPSTREAM_METHOD:
        return dict(cfg, flavour="upstream")
    raise CheckpointError(f"{path}: unrecognised {CONFIG_FILE}: expected format {FORMAT_NAME!r} or upstream's "
                          f"quantization_method {UPSTREAM_METHOD!r}, got format={cfg.get('format')!r}, "
                          f"quantization_method={cfg.get('quantization_method')!r}")


def _read_header(shard: str) -> dict:
    """Parse and check a safetensors header ourselves, for clear errors on damaged files."""
    size = os.path.getsize(shard)
    if size < 8:
        raise CheckpointError(f"shard {shard} is truncated ({size} bytes; not even a header length)")
    with open(shard, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"shard {shard} has a corrupted or truncated header (declares {n} header "
                                  f"bytes, file has {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"shard {shard} has a corrupted header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"shard {shard} has a corrupted header (not a JSON object)")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, stop = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"shard {shard} has a corrupted header entry for {name!r}: {info!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        if stop - start != numel * torch.empty((), dtype=dtype).element_size():
            raise CheckpointError(f"shard {shard}: header entry {name!r} has {stop - start} bytes for shape {shape} {dtype}")
        header[name] = (shape, dtype)
        end = max(end, stop)
    data = size - 8 - n
    if data < end:
        raise CheckpointError(f"shard {shard} is truncated: its header needs {end} data bytes, the file has {data}")
    return header


def _check_weight_map(wm, where: str) -> dict:
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        kind = type(wm).__name__
        raise CheckpointError(f"{where}: 'weight_map' must be a non-empty JSON object mapping tensor names to shard "
                              f"files, got {'an empty one' if isinstance(wm, dict) else 'a ' + kind}")
    return wm


def _weight_map(path: str, cfg: dict) -> dict:
    if cfg["flavour"] == "longcat" and cfg["format_version"] >= 2:
        return cfg["weight_map"]
    index_name = V1_INDEX_FILE if cfg["flavour"] == "longcat" else UPSTREAM_INDEX_FILE
    index_path = os.path.join(path, index_name)
    if os.path.isfile(index_path):
        return _check_weight_map(_read_json(index_path, index_name).get("weight_map"), index_path)
    if cfg["flavour"] == "longcat":
        raise CheckpointError(f"{path}: index {V1_INDEX_FILE} is missing (incomplete save?)")
    singles = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not singles:
        raise CheckpointError(f"{path}: no {UPSTREAM_INDEX_FILE} and no .safetensors file")
    wm = {}
    for f in singles:
        for k in _read_header(shard_path(path, f, f"{path}")):
            wm[k] = f
    return wm


def _build_model(model) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if callable(model):
        with torch.device("meta"):
            built = model()
        if not isinstance(built, nn.Module):
            raise TypeError(f"the model factory must return an nn.Module, got {type(built).__name__}")
        return built
    raise TypeError("model must be an nn.Module (ideally built on the meta device) or a callable building one, "
                    f"got {type(model).__name__}")


def _set_tensor(model: nn.Module, name: str, t: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(t, requires_grad=bool(old is not None and old.requires_grad and t.is_floating_point()))
    elif leaf in owner._buffers:
        owner._buffers[leaf] = t
    else:
        raise CheckpointError(f"cannot place tensor {name!r}: no such parameter or buffer")


def load_quantized(path: str, model: Union[nn.Module, Callable[[], nn.Module]], *, device="cpu",
                   dtype: Optional[torch.dtype] = None, strict: bool = True, verify: bool = True) -> nn.Module:
    """Load a quantized checkpoint (this package's format or upstream's ``base_model_int8``).

    path: the checkpoint folder. model: a callable returning the float model (called under
    ``torch.device("meta")``) or an ``nn.Module`` built on the meta device; its Linear layers named
    in the checkpoint are replaced by empty QuantizedLinear modules before the tensors are assigned.
    device: where the tensors go. dtype: if given, floating-point tensors that are not quantized
    weights or scales (biases, norms, embedders, skipped layers) are cast to it (upstream keeps
    them in bf16). strict: refuse checkpoint tensors the model does not have. verify: check every
    shard's size and CRC-32 against those recorded at save (reads each shard once more);
    ``verify=False`` skips it for trusted fast loads. Shards must lie in the folder: absolute
    paths, ``..`` and symbolic links leading out of it are refused.
    Returns the model in eval mode. Raises ``CheckpointError`` (a ValueError) with the reason on
    any mismatch, and FileNotFoundError-free clear messages for missing files.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder not found: {path}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    device = torch.device(device)
    cfg = read_quantization_config(path)
    flavour = cfg["flavour"]
    weight_map = _weight_map(path, cfg)

    # Every shard inside the folder, present and intact; the index agrees with the shard headers.
    headers = {}
    for shard in sorted(set(weight_map.values())):
        full = shard_path(path, shard, f"the weight map of {path}")
        if not os.path.isfile(full):
            listed = sum(1 for v in weight_map.values() if v == shard)
            raise CheckpointError(f"missing shard {shard!r} (the index lists {listed} tensors in it) in {path}")
        headers[shard] = _read_header(full)
    if verify:
        recorded = cfg["shards"] if flavour == "longcat" and cfg["format_version"] >= 2 else None
        verify_shards(path, headers, recorded, "quantized checkpoint")
    stored = {}
    for key, shard in weight_map.items():
        if key not in headers[shard]:
            raise CheckpointError(f"tensor {key!r} is listed in the index under {shard!r} but that shard does not hold it")
        stored[key] = headers[shard][key]

    # Which layers are quantized, and how.
    if flavour == "longcat":
        plan = {}
        for name, entry in cfg["modules"].items():
            try:
                plan[name] = LayerSpec.from_dict(entry)
            except ValueError as e:
                raise CheckpointError(f"{path}: module {name!r}: {e}") from None
        rename = {}
    else:
        plan = {k[: -len(".weight_int8")]: LayerSpec("int8", False) for k in stored if k.endswith(".weight_int8")}
        rename = {k: k[: -len("weight_int8")] + "weight_q" for k in stored if k.endswith(".weight_int8")}

    model = _build_model(model)
    for name, spec in plan.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the checkpoint quantizes module {name!r} but the model has no such module") from None
        if isinstance(mod, QuantizedLinear):
            if mod.spec != spec:
                raise CheckpointError(f"module {name!r} is already quantized as {mod.spec.name}, the checkpoint holds {spec.name}")
            continue
        if not isinstance(mod, nn.Linear):
            raise CheckpointError(f"the checkpoint quantizes {name!r}, which is a {type(mod).__name__}, not an nn.Linear")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, QuantizedLinear.from_spec(mod, spec, device="meta"))

    # Names, shapes and dtypes, all checked before reading data.
    expected = model.state_dict(keep_vars=True)
    quant_keys = {f"{n}.{b}" for n in plan for b in QuantizedLinear._quantized_buffers}
    ckpt_to_model = {k: rename.get(k, k) for k in stored}
    present = set(ckpt_to_model.values())
    missing = [k for k in expected if k not in present]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}")
    unexpected = [k for k, m in ckpt_to_model.items() if m not in expected]
    if unexpected and strict:
        raise CheckpointError(f"checkpoint {path} holds {len(unexpected)} tensors the model does not have, "
                              f"e.g. {unexpected[:5]} (pass strict=False to ignore them)")
    for key, mkey in ckpt_to_model.items():
        if mkey not in expected:
            continue
        shape, st_dtype = stored[key]
        want = expected[mkey]
        if tuple(want.shape) != shape:
            raise CheckpointError(f"tensor {key!r}: checkpoint shape {list(shape)} does not match the model's {list(want.shape)}")
        if mkey in quant_keys or not want.is_floating_point():
            if st_dtype != want.dtype:
                raise CheckpointError(f"tensor {key!r}: checkpoint dtype {st_dtype} where {want.dtype} is required")
        elif not st_dtype.is_floating_point:
            raise CheckpointError(f"tensor {key!r}: checkpoint dtype {st_dtype} where a floating-point tensor is required")

    # Assign, shard by shard.
    by_shard: dict = {}
    for key, shard in weight_map.items():
        if ckpt_to_model[key] in expected:
            by_shard.setdefault(shard, []).append(key)
    for shard, keys in by_shard.items():
        with safe_open(os.path.join(path, shard), framework="pt", device="cpu") as f:
            for key in keys:
                mkey = ckpt_to_model[key]
                t = f.get_tensor(key)
                if dtype is not None and mkey not in quant_keys and t.is_floating_point():
                    t = t.to(dtype)
                _set_tensor(model, mkey, t.to(device))

    # Tensors the checkpoint does not carry (non-persistent buffers) must exist already.
    leftover = [n for n, b in model.named_buffers() if b is not None and b.device.type == "meta"]
    leftover += [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"after loading, {len(leftover)} tensors are still on the meta device "
                              f"(non-persistent buffers?): {leftover[:5]}; build them outside the meta device")
    for mod in model.modules():
        for leaf, b in list(mod._buffers.items()):
            if b is not None and b.device != device and not (device.type == "cuda" and b.device.type == "cuda" and device.index is None):
                mod._buffers[leaf] = b.to(device)

    if flavour == "longcat" and isinstance(cfg.get("config"), dict):
        try:
            setattr(model, CONFIG_ATTR, config_from_dict(cfg["config"]))
        except (ValueError, TypeError):
            pass
    elif flavour == "upstream":
        setattr(model, CONFIG_ATTR, None)
    return model.eval()
