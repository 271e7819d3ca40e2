"""Min-SNR-γ loss weights and the SNR they are computed from, against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from lorajobs.jobspecs.failures import UserDataError
from lorajobs.worker.trainers.image.objective import min_snr_weights, snr_at

GAMMA = 5.0
# SNR below, at and above γ, and 0 (the last step of a zero-terminal-SNR schedule).
SNR = torch.tensor([0.5, 5.0, 20.0, 0.0])


def test_epsilon_weights_are_min_snr_gamma_over_snr() -> None:
    # min(SNR, 5) / SNR: 0.5/0.5, 5/5, 5/20; and 1 (the limit) rather than 0/0 at SNR 0.
    expected = torch.tensor([1.0, 1.0, 0.25, 1.0])
    torch.testing.assert_close(min_snr_weights(SNR, GAMMA, "epsilon"), expected)


def test_v_prediction_weights_divide_by_snr_plus_one() -> None:
    # min(SNR, 5) / (SNR + 1): 0.5/1.5, 5/6, 5/21, 0/1.
    expected = torch.tensor([1 / 3, 5 / 6, 5 / 21, 0.0])
    torch.testing.assert_close(min_snr_weights(SNR, GAMMA, "v_prediction"), expected)


def test_sample_prediction_weights_are_the_clipped_snr() -> None:
    expected = torch.tensor([0.5, 5.0, 5.0, 0.0])
    torch.testing.assert_close(min_snr_weights(SNR, GAMMA, "sample"), expected)


def test_an_unknown_prediction_type_is_the_models_fault() -> None:
    with pytest.raises(UserDataError, match="prediction_type 'flow'"):
        min_snr_weights(SNR, GAMMA, "flow")


def test_snr_from_the_cumulative_alphas() -> None:
    alphas_cumprod = torch.tensor([0.8, 0.5, 0.2], dtype=torch.float64)
    # ᾱ / (1 - ᾱ): 0.8/0.2, 0.5/0.5, 0.2/0.8, picked by timestep.
    snr = snr_at(alphas_cumprod, torch.tensor([2, 0, 1, 0]))
    assert snr.dtype == torch.float32
    torch.testing.assert_close(snr, torch.tensor([0.25, 4.0, 1.0, 4.0]))


def test_snr_matches_diffusers_compute_snr() -> None:
    """The same numbers as diffusers' training scripts get from `compute_snr`."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 1, 250, 500, 999])
    torch.testing.assert_close(
        snr_at(scheduler.alphas_cumprod, t), compute_snr(scheduler, t), rtol=1e-5, atol=0
    )
