"""What a new user meets first: subpackages reachable after ``import longcat``, and an
acceleration report that tells the model's live state."""
import subprocess
import sys

import pytest

import longcat
from longcat import LongCatVideoTransformer3DModel
from upstream_like import UpstreamLikeDiT


def test_subpackages_are_reachable_after_import_longcat():
    # A fresh interpreter: in this one, other tests have imported the subpackages already.
    code = (
        "import longcat, sys\n"
        "assert 'longcat.bench' not in sys.modules, 'the harness is imported on first use only'\n"
        "print(longcat.pipeline_memory.decode_latents_tiled.__name__, longcat.context_parallel.__name__,\n"
        "      longcat.quant.__name__, longcat.kernels.__name__, longcat.bench.__name__)\n"
        "try:\n"
        "    longcat.no_such_module\n"
        "except AttributeError as err:\n"
        "    print('AttributeError', err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == (
        "decode_latents_tiled longcat.context_parallel longcat.quant longcat.kernels longcat.bench")
    assert "has no attribute 'no_such_module'" in done.stdout


@pytest.mark.parametrize("make", [UpstreamLikeDiT, lambda: LongCatVideoTransformer3DModel.from_preset("tiny")],
                         ids=["upstream", "ours"])
def test_acceleration_report_shows_bsa_switched_after_accelerate(make):
    model = make().eval()
    longcat.accelerate(model, attention="reference")
    assert longcat.acceleration_report(model).bsa_blocks == 0
    model.enable_bsa()  # upstream's demo order: accelerate (or load), then enable_bsa()
    report = longcat.acceleration_report(model)
    assert report.bsa_blocks == len(model.blocks) > 0
    assert f"enabled in {len(model.blocks)} blocks" in str(report)
    model.blocks[0].attn.enable_bsa = False
    assert longcat.acceleration_report(model).bsa_blocks == len(model.blocks) - 1
    model.disable_bsa()
    assert longcat.acceleration_report(model).bsa_blocks == 0
