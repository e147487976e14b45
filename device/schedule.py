"""How long the learning-rate warm-up lasts: a fraction of the run by default, clamped when asked for too much.

A fixed warm-up in epochs breaks short runs: 3 warm-up epochs of a 3-epoch run never let the cosine decay, and
of a 2-epoch run never reach the peak. A fraction of the run scales with it; an explicit ``--warmup EPOCHS``
longer than half the run is cut to half, with a warning, so the cosine always has room to decay.
"""

from __future__ import annotations

DEFAULT_WARMUP_FRACTION = 0.1  # 3 of the default 30 epochs, the recipe's warm-up before this option existed
MAX_WARMUP_FRACTION = 0.5


def warmup_steps(warmup_epochs: float | None, warmup_fraction: float, steps_per_epoch: int,
                 total_steps: int) -> tuple[int, str | None]:
    """Warm-up length in steps, and a warning when an explicit ``warmup_epochs`` had to be clamped."""
    if warmup_epochs is None:
        return int(round(warmup_fraction * total_steps)), None
    asked = int(round(warmup_epochs * steps_per_epoch))
    limit = int(MAX_WARMUP_FRACTION * total_steps)
    if asked <= limit:
        return asked, None
    epochs = total_steps / max(steps_per_epoch, 1)
    return limit, (f"--warmup {warmup_epochs:g} epochs is more than half of a {epochs:g}-epoch run, so the learning "
                   f"rate would hardly decay; warming up for {limit} of {total_steps} steps instead "
                   f"(pass --warmup-fraction F to choose a fraction)")
