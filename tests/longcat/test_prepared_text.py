"""Text offsets are validated where they are made or accepted: a hand-built PreparedText and
upstream's per-sample text lengths. The attention kernels trust them at every block."""
import pytest
import torch

from longcat.accelerate import _check_text_lengths
from longcat.model import PreparedText


def _text(rows=7, channels=8):
    return torch.randn((rows, channels), generator=torch.Generator().manual_seed(0))


def test_valid_prepared_text_is_accepted():
    text, cu = _text(), torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    prepared = PreparedText(text, cu)
    assert prepared.text is text and prepared.cu_seqlens is cu
    text_again, cu_again = prepared  # still unpacks as a pair
    assert text_again is text and cu_again is cu


@pytest.mark.parametrize(
    "cu, message",
    [
        ([0, 3, 9], "must start at 0 and end at the packed length 7"),  # past the text
        ([0, 5, 2, 7], "must be non-decreasing"),
        ([1, 3, 7], "must start at 0"),
        ([7], r"must hold batch \+ 1 >= 2 offsets"),
    ],
)
def test_hand_built_prepared_text_with_bad_offsets_is_refused(cu, message):
    with pytest.raises(ValueError, match=rf"prepared_text\.cu_seqlens {message}"):
        PreparedText(_text(), torch.tensor(cu, dtype=torch.int32))


def test_hand_built_prepared_text_with_bad_tensors_is_refused():
    with pytest.raises(TypeError, match=r"prepared_text\.cu_seqlens has dtype float32"):
        PreparedText(_text(), torch.tensor([0.0, 7.0]))
    with pytest.raises(ValueError, match=r"prepared_text\.text must have 2 dimensions"):
        PreparedText(_text()[None], torch.tensor([0, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"prepared_text\.cu_seqlens is on meta"):
        PreparedText(_text(), torch.tensor([0, 7], dtype=torch.int32, device="meta"))


def test_upstream_text_lengths_are_checked_where_offsets_are_made():
    _check_text_lengths([3, 0, 4], 7)
    for bad in ([3, 5], [8, -1], []):
        with pytest.raises(ValueError, match="y_seqlen must be non-negative text lengths summing to the 7"):
            _check_text_lengths(bad, 7)
