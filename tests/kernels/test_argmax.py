import pytest
import torch

from kernels.argmax_triton import CHUNK, argmax_rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_argmax_rows_is_torch_argmax_ties_included(device, dtype):
    """Each row's first index of its maximum, as torch.argmax: ties across chunks and
    within one, the maximum in the last (partial) chunk, in the first element."""
    rows, n = (6, 2 * CHUNK + 37) if device.type == "cpu" else (33, 128256)
    x = torch.randn(rows, n, device=device).to(dtype)
    top = x.float().max().item() + 1
    x[1, [5, CHUNK + 9]] = top  # a tie across chunks
    x[2, [CHUNK + 3, CHUNK + 4]] = top  # a tie inside one chunk
    x[3, n - 1] = top  # the partial last chunk
    x[4, 0] = top
    x[5] = 0  # every element ties
    with torch.no_grad():
        got = argmax_rows(x)
    assert got.dtype == torch.int64
    assert got.tolist() == x.argmax(dim=-1).tolist()
    assert got[1:6].tolist() == [5, CHUNK + 3, n - 1, 0, 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_argmax_rows_takes_nan_as_the_maximum(device, dtype):
    """NaN beats every number, as in torch.argmax: a row with NaN gives its first NaN's
    index, never an index past the vocabulary (which the next embedding lookup would
    fault on)."""
    rows, n = (5, 2 * CHUNK + 37) if device.type == "cpu" else (33, 128256)
    x = torch.randn(rows, n, device=device).to(dtype)
    nan, top = float("nan"), x.float().max().item() + 1
    x[0] = nan  # every element
    x[1, : CHUNK + 5] = nan  # the whole first chunk, and into the second
    x[2, [7, CHUNK + 1]] = top
    x[2, [2 * CHUNK + 3, 2 * CHUNK + 9]] = nan  # in the last chunk only, after the maximum
    x[3] = float("-inf")  # every element ties at -inf
    x[4, n - 1] = nan  # the last element
    with torch.no_grad():
        got = argmax_rows(x)
    assert got.tolist() == x.argmax(dim=-1).tolist()
    assert got[:5].tolist() == [0, 0, 2 * CHUNK + 3, 0, n - 1]
