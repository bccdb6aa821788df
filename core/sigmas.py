"""Where a warm start enters a sampling schedule.

Why: starting from an upsampled low-res image, the first steps of a schedule (the ones
that would build the composition from noise) are skipped; the sampler then noises the
clean latent to the first remaining sigma itself (flow matching: sigma * eps +
(1 - sigma) * x0), so the latent handed over stays clean.
"""

from __future__ import annotations

import torch


def remaining_sigmas(sigmas: torch.Tensor, skip: int = 0, start_sigma: float | None = None) -> torch.Tensor:
    """The tail of a descending schedule (ending in 0) that a warm-started sampler runs.

    ``start_sigma`` (0 < s <= 1) wins over ``skip``: the schedule then starts exactly at s and
    continues with the original sigmas below s.
    """
    steps = sigmas.numel() - 1
    if start_sigma:
        if not 0 < start_sigma <= float(sigmas[0]):
            raise ValueError(f"start sigma must lie in (0, {float(sigmas[0]):.3g}], got {start_sigma}")
        below = sigmas[sigmas < start_sigma]
        return torch.cat([sigmas.new_tensor([start_sigma]), below])
    if not 0 <= skip < steps:
        raise ValueError(f"skip must be at least 0 and less than the {steps} steps, got {skip}")
    return sigmas[skip:].clone()
