"""A module skeleton from a state-dict shape listing, for byte accounting and loader tests when
the model class is not at hand (``longcat.quant`` does not import the model).

``{name: shape}`` becomes nested modules: a 2-D ``<m>.weight`` becomes ``nn.Linear`` (with a bias
when ``<m>.bias`` is listed), a 5-D one ``nn.Conv3d``, anything else plain parameters. Built on the
meta device by default, so a 13.6B-parameter listing costs no memory.
"""
from __future__ import annotations

import json
from typing import Mapping, Sequence, Union

import torch
import torch.nn as nn

__all__ = ["module_from_shapes", "load_shape_listing"]


def load_shape_listing(path: str) -> dict:
    """``{name: [shape, dtype]}`` or ``{name: shape}`` JSON -> ``{name: (shape, dtype)}``."""
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    out = {}
    for name, v in raw.items():
        if isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[0], (list, tuple)):
            out[name] = (tuple(v[0]), getattr(torch, v[1]) if isinstance(v[1], str) else torch.float32)
        else:
            out[name] = (tuple(v), torch.float32)
    return out


class _Holder(nn.Module):
    pass


def module_from_shapes(shapes: Mapping[str, Union[Sequence[int], tuple]], device="meta", dtype=torch.float32) -> nn.Module:
    """Nested modules whose state dict has exactly the listed names and shapes (in ``dtype``)."""
    norm = {}
    for name, v in shapes.items():
        shape = v[0] if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], (tuple, list)) else v
        norm[name] = tuple(int(s) for s in shape)
    owners: dict = {}
    for name, shape in norm.items():
        owner, _, leaf = name.rpartition(".")
        owners.setdefault(owner, {})[leaf] = shape
    root = _Holder()

    def get_or_make(path: str) -> nn.Module:
        mod = root
        for part in path.split(".") if path else []:
            if part not in mod._modules:
                mod.add_module(part, _Holder())
            mod = mod._modules[part]
        return mod

    for owner in owners:  # insertion order keeps the listing's order
        leaves = owners[owner]
        w = leaves.get("weight")
        parent_path, _, attr = owner.rpartition(".")
        if w is not None and len(w) == 2 and set(leaves) <= {"weight", "bias"}:
            new = nn.Linear(w[1], w[0], bias="bias" in leaves, device=device, dtype=dtype)
        elif w is not None and len(w) == 5 and set(leaves) <= {"weight", "bias"}:
            new = nn.Conv3d(w[1], w[0], kernel_size=tuple(w[2:]), stride=tuple(w[2:]), bias="bias" in leaves, device=device, dtype=dtype)
        else:
            new = None
        if new is not None and owner:
            parent = get_or_make(parent_path)
            parent.add_module(attr, new)
            continue
        holder = get_or_make(owner)
        for leaf, shape in leaves.items():
            holder.register_parameter(leaf, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
    return root
