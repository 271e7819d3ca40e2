"""The Flux trainer's cuDNN attention switch is the job's, not the worker process's: off while
a Flux job trains, then as it was before, also when the job fails (a Ray task worker is reused
for later jobs). The flag is process state that torch keeps on any device, so this runs on a
CPU; tests/integration/test_image_flux.py checks it around a real Flux job."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from lorajobs.worker.trainers.image.flux import cudnn_attention_off


@pytest.fixture
def restore_flag() -> Iterator[None]:
    before = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.parametrize("before", [True, False])
def test_off_inside_and_as_it_was_after(before: bool, restore_flag: None) -> None:
    torch.backends.cuda.enable_cudnn_sdp(before)
    with cudnn_attention_off():
        assert torch.backends.cuda.cudnn_sdp_enabled() is False
    assert torch.backends.cuda.cudnn_sdp_enabled() is before


def test_restored_when_the_job_fails(restore_flag: None) -> None:
    torch.backends.cuda.enable_cudnn_sdp(True)
    with pytest.raises(RuntimeError, match="NaN"), cudnn_attention_off():
        raise RuntimeError("loss is NaN")
    assert torch.backends.cuda.cudnn_sdp_enabled() is True
