"""Gather*: which layers are summed together (``--groups``), and how a summed map is scaled and stored.

A feature row is (k, T, d): one summed map per group. The sums are fp32 (they are accumulated in the tap
hooks, see ``taps.py``); this module only parses the groups, checks that their shapes agree, and turns the
fp32 sums into the stored dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import CloudError

SCALES = ("none", "mean")
DTYPES = {"float16": torch.float16, "float32": torch.float32}
GROUPS_HELP = ("comma-separated groups; each is an index '12', an inclusive range '0-12' or 'last'; "
               "or 'auto' (the longest run of equal shapes), 'all' (one group of every layer) or 'each' "
               "(every layer its own group)")


def parse_groups(spec: str, num_layers: int) -> list[list[int]]:
    """Parse a ``--groups`` spec for a backbone with layers 0..num_layers-1 into lists of layer indices."""
    if num_layers < 1:
        raise CloudError("the backbone has no tappable layers")
    last = num_layers - 1
    text = spec.strip().lower()
    if text == "all":
        return [list(range(num_layers))]
    if text == "each":
        return [[i] for i in range(num_layers)]
    groups = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise CloudError(f"--groups {spec!r}: empty group (two commas, or a comma at an end?)")
        if "-" in part:
            lo_text, _, hi_text = part.partition("-")
            lo, hi = _index(lo_text, spec, last), _index(hi_text, spec, last)
            if lo > hi:
                raise CloudError(f"--groups {spec!r}: range '{part}' runs backwards")
            groups.append(list(range(lo, hi + 1)))
        else:
            groups.append([_index(part, spec, last)])
    return groups


def _index(text: str, spec: str, last: int) -> int:
    text = text.strip()
    if text == "last":
        return last
    if not text.isdigit():
        raise CloudError(f"--groups {spec!r}: '{text}' is not a layer index, 'last', 'auto', 'all' or 'each' "
                         f"({GROUPS_HELP})")
    index = int(text)
    if index > last:
        raise CloudError(f"--groups {spec!r}: layer {index} does not exist (layers are 0-{last}; "
                         "see `mist-cloud info MODEL`)")
    return index


def format_groups(groups: Sequence[Sequence[int]]) -> str:
    """The inverse of ``parse_groups`` for contiguous groups: [[0, 1, 2], [5]] -> '0-2,5'."""
    parts = []
    for g in groups:
        contiguous = list(g) == list(range(g[0], g[0] + len(g)))
        if len(g) > 1 and contiguous:
            parts.append(f"{g[0]}-{g[-1]}")
        else:
            parts.extend(str(i) for i in g)  # not expressible as one range; only for display
    return ",".join(parts)


def check_group_shapes(groups: Sequence[Sequence[int]], shapes: Sequence[tuple[int, int]],
                       names: Sequence[str]) -> tuple[int, int]:
    """Every layer used by any group must share one (T, d): the stored tensor is (n, k, T, d).

    Returns that (T, d); otherwise a short error lists the distinct shapes with the layers that have them
    (the first few; a 20-layer CNN has a dozen shapes) and names a ``--groups`` that works.
    """
    used = sorted({i for g in groups for i in g})
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i in used:
        by_shape.setdefault(tuple(shapes[i]), []).append(i)
    if len(by_shape) == 1:
        return next(iter(by_shape))
    shown = list(by_shape.items())[:MAX_SHAPES_LISTED]
    listing = "; ".join(f"(T={t}, d={d}): {_layers_text(layers, names)}" for (t, d), layers in shown)
    if len(by_shape) > len(shown):
        listing += f"; and {len(by_shape) - len(shown)} more shapes"
    raise CloudError(f"--groups {format_groups(groups)} mixes layers of {len(by_shape)} different shapes, {listing}; "
                     f"one group needs one (T, d): try --groups auto (here {format_groups(auto_groups(shapes))}), "
                     "or see `mist-cloud info MODEL`")


MAX_SHAPES_LISTED = 4


def _layers_text(layers: list[int], names: Sequence[str]) -> str:
    """[5, 6, 9] -> '5-6 (blocks.5..blocks.6), 9 (blocks.9)': runs of consecutive layers, each named once."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]} ({names[r[0]]})" if len(r) == 1 else f"{r[0]}-{r[-1]} ({names[r[0]]}..{names[r[-1]]})"
                     for r in runs)


def auto_groups(shapes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """``--groups auto``: one group of the longest run of consecutive layers with equal (T, d), the later run
    on a tie (deeper layers carry more task-relevant features). Valid for every backbone: on a ViT it is
    every layer (``all``), on a CNN the deepest longest stage (Lite0: 12-15, stage 5)."""
    if not shapes:
        raise CloudError("the backbone has no tappable layers")
    best_start, best_len, start = 0, 1, 0
    for i in range(1, len(shapes) + 1):
        if i == len(shapes) or tuple(shapes[i]) != tuple(shapes[start]):
            if i - start >= best_len:
                best_start, best_len = start, i - start
            start = i
    return [list(range(best_start, best_start + best_len))]


def same_shape_runs(shapes: list[tuple[int, int]]) -> list[list[int]]:
    """Maximal runs of consecutive layers with equal (T, d): each a valid group (``mist-cloud info`` lists them)."""
    runs: list[list[int]] = []
    for i, shape in enumerate(shapes):
        if runs and shapes[runs[-1][-1]] == shape:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


POOLS = ("none", "mean", "cls")


def pool_tokens(sums: torch.Tensor, pool: str) -> torch.Tensor:
    """``--pool``: (B, k, T, d) -> (B, k, 1, d), the mean over all T tokens or the class token (token 0), so
    a probe on pooled features ships d values per map instead of T x d. ``none`` keeps the tokens."""
    if pool == "none":
        return sums
    if pool == "mean":
        return sums.mean(dim=2, keepdim=True)
    if pool == "cls":
        return sums[:, :, :1]
    raise CloudError(f"--pool must be one of {POOLS}, got {pool!r}")


def finish(sums: torch.Tensor, groups: Sequence[Sequence[int]], scale: str, dtype: str) -> torch.Tensor:
    """fp32 group sums (B, k, T, d) -> scaled and cast to the storage dtype, refusing fp16 overflow."""
    if scale not in SCALES:
        raise CloudError(f"--scale must be one of {SCALES}, got {scale!r}")
    if scale == "mean":
        sizes = torch.tensor([len(g) for g in groups], dtype=sums.dtype, device=sums.device)
        sums = sums / sizes.view(1, -1, 1, 1)
    out = sums.to(DTYPES[dtype])
    # One cheap pass in the common case; the details are only worked out when something overflowed.
    if dtype == "float16" and bool(torch.isinf(out).any()):
        bad = torch.isinf(out) & torch.isfinite(sums)  # inf that the cast made, not inf already there
        if bool(bad.any()):
            g = int(bad.nonzero()[0, 1])
            peak = float(sums[:, g].abs().max())
            raise CloudError(
                f"float16 overflow: group {g} (layers {format_groups([groups[g]])}) reaches |x| = {peak:.4g} "
                "> 65504; use --scale mean or --dtype float32"
            )
    return out
