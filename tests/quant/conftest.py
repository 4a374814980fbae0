"""Models for the quantizer tests: a small stand-in DiT with LongCat's module names (the real model
is used where ``longcat.LongCatVideoTransformer3DModel`` is importable), and a meta-device model
with exactly the golden full-size state-dict shapes."""
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F


def real_model_class():
    try:
        import longcat

        return getattr(longcat, "LongCatVideoTransformer3DModel", None), getattr(longcat, "get_preset", None)
    except Exception:
        return None, None


class _Attn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.q_norm = nn.LayerNorm(c, elementwise_affine=False)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.proj(self.q_norm(q) * torch.sigmoid(k) + v)


class _Cross(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.q_linear = nn.Linear(c, c)
        self.kv_linear = nn.Linear(c, 2 * c)
        self.proj = nn.Linear(c, c)

    def forward(self, x, y):
        k, v = self.kv_linear(y).chunk(2, -1)
        w = torch.softmax(self.q_linear(x) @ k.transpose(-1, -2) / x.shape[-1] ** 0.5, -1)
        return self.proj(w @ v)


class _FFN(nn.Module):
    def __init__(self, c, h):
        super().__init__()
        self.w1 = nn.Linear(c, h, bias=False)
        self.w2 = nn.Linear(h, c, bias=False)
        self.w3 = nn.Linear(c, h, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _Block(nn.Module):
    def __init__(self, c, h, t):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(t, 6 * c))
        self.attn = _Attn(c)
        self.cross_attn = _Cross(c)
        self.ffn = _FFN(c, h)
        self.norm = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)

    def forward(self, x, y, t):
        sa, sc, ga, sm, scm, gm = self.adaLN_modulation(t).unsqueeze(1).chunk(6, -1)
        x = x + ga * self.attn(self.norm(x) * (1 + sc) + sa)
        x = x + self.cross_attn(x, y)
        return x + gm * self.ffn(self.norm(x) * (1 + scm) + sm)


class _Final(nn.Module):
    def __init__(self, c, t, out):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(t, 2 * c))
        self.linear = nn.Linear(c, out)
        self.norm = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)

    def forward(self, x, t):
        shift, scale = self.adaLN_modulation(t).unsqueeze(1).chunk(2, -1)
        return self.linear(self.norm(x) * (1 + scale) + shift)


class MiniDiT(nn.Module):
    """LongCat-like names and dataflow (adaLN, qkv/proj, cross q/kv/proj, SwiGLU w1/w2/w3) at toy size."""

    def __init__(self, hidden=64, depth=2, caption=48, tdim=32, mlp_hidden=176, out=16):
        super().__init__()
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Linear(out, hidden)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(16, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.y_embedder = nn.Module()
        self.y_embedder.y_proj = nn.Sequential(nn.Linear(caption, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList([_Block(hidden, mlp_hidden, tdim) for _ in range(depth)])
        self.final_layer = _Final(hidden, tdim, out)

    def forward(self, x, t, y):
        h = self.x_embedder.proj(x)
        te = self.t_embedder.mlp(t)
        ye = self.y_embedder.y_proj(y)
        for b in self.blocks:
            h = b(h, ye, te)
        return self.final_layer(h, te)


def make_inputs(gen, batch=2, tokens=24, out=16, caption=48, text=7):
    return (torch.randn(batch, tokens, out, generator=gen), torch.randn(batch, 16, generator=gen),
            torch.randn(batch, text, caption, generator=gen))


@pytest.fixture
def mini_dit(gen):
    torch.manual_seed(0)
    return MiniDiT()


def golden_shapes():
    here = os.path.dirname(__file__)
    for folder in (os.environ.get("LONGCAT_GOLDEN_DIR", ""), os.path.join(here, "..", "..", "..", "shared", "golden"),
                   os.path.join(here, "..", "..", "shared", "golden")):
        path = os.path.join(folder, "full_state_dict.json")
        if folder and os.path.isfile(path):
            with open(path) as f:
                return {k: tuple(v[0]) for k, v in json.load(f).items()}
    pytest.skip("golden full_state_dict.json not found (set LONGCAT_GOLDEN_DIR)")


@pytest.fixture
def MiniDiT_cls():
    """The stand-in model class (tests build extra instances, e.g. on the meta device)."""
    return MiniDiT


@pytest.fixture
def dit_inputs(gen):
    return make_inputs(gen)


@pytest.fixture
def real_model():
    """(LongCatVideoTransformer3DModel, get_preset) when importable, else skip."""
    cls, get_preset = real_model_class()
    if cls is None or get_preset is None:
        pytest.skip("longcat.LongCatVideoTransformer3DModel / get_preset not importable yet")
    return cls, get_preset


@pytest.fixture
def golden_full_shapes():
    return golden_shapes()
