"""``train --grid`` and ``--model probe|lae|auto``: which models a search trains, and which one it keeps.

A search is a run of device/train.py's one loop with many members: every adaptor configuration of the grid
trains side by side on batches prepared once, and the probes (device/probe.py) are fitted before the first
epoch. All members share the epochs, the batch size, the shuffle and the validation split, so they differ
only in what the grid varies.

At the end the member with the best validation accuracy (ties: lower validation loss, then the simpler
model: probes before adaptors, in grid order) becomes the run's ``best.safetensors``; every member's best is
kept in ``members/``, and the table is printed and written to ``grid.json``.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from mist.formats import FeatureSet, load_checkpoint, save_checkpoint
from mist.formats.atomic import atomic_write_bytes

from .kinds import describe, kind_of, model_checkpoint, shipped_bytes_per_image
from .lae import LAEConfig
from .probe import FEATURES, ProbeConfig
from .record import feature_set_record
from .run_state import BEST, GRID_TABLE, MEMBERS
from .train import Trainer, TrainingError, TrainOptions

# grid key -> (field, type, which object it sets): the adaptor's config or the member's optimiser options
GRID_KEYS: dict[str, tuple[str, type, str]] = {
    "lr": ("lr", float, "opt"), "wd": ("weight_decay", float, "opt"), "ls": ("label_smoothing", float, "opt"),
    "blocks": ("blocks_per_group", int, "cfg"), "rank": ("rank", int, "cfg"), "heads": ("heads", int, "cfg"),
    "pos": ("pos_embed", bool, "cfg"),
}
PROBE_FEATURES = FEATURES
PROBE_L2 = (1e-3, 1e-2, 1e-1, 1.0)


def parse_grid(spec: str) -> list[dict[str, Any]]:
    """'lr=1e-3,3e-3 blocks=1,4' -> the cartesian product as a list of {key: value}, in spec order."""
    path = Path(spec)
    if "=" not in spec and path.is_file():
        spec = path.read_text()
    axes: list[tuple[str, list[Any]]] = []
    for part in spec.split():
        key, sep, values = part.partition("=")
        if not sep or key not in GRID_KEYS or not values:
            raise ValueError(f"--grid: {part!r} is not KEY=V1,V2 with a key from {', '.join(GRID_KEYS)}")
        if key in dict(axes):
            raise ValueError(f"--grid: {key} is given twice")
        kind = GRID_KEYS[key][1]
        try:
            parsed = [_parse_value(v, kind) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"--grid: {part!r} has a value that is not a {kind.__name__}") from None
        axes.append((key, parsed))
    if not axes:
        raise ValueError("--grid: empty; give at least one KEY=V1,V2")
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def _parse_value(text: str, kind: type) -> Any:
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    value = kind(text)
    if kind is float and not math.isfinite(value):
        raise ValueError(text)
    return value


def member_name(combo: dict[str, Any]) -> str:
    """'lae-lr0.003-blocks4-pos1': the grid point's values in spec order; 'lae-defaults' for none."""
    if not combo:
        return "lae-defaults"
    return "lae-" + "-".join(f"{k}{int(v) if isinstance(v, (bool, int)) else format(v, 'g')}" for k, v in combo.items())


def member_specs(combos: list[dict[str, Any]], base_cfg: LAEConfig,
                 opts: TrainOptions) -> dict[str, tuple[LAEConfig, TrainOptions]]:
    """name -> (adaptor config, training options) for every grid point; one-line TrainingErrors."""
    specs: dict[str, tuple[LAEConfig, TrainOptions]] = {}
    for combo in combos:
        cfg = replace(base_cfg, **{GRID_KEYS[k][0]: v for k, v in combo.items() if GRID_KEYS[k][2] == "cfg"})
        try:
            cfg.validate()
        except ValueError as e:
            raise TrainingError(f"--grid point {member_name(combo)}: {e}") from None
        name = member_name(combo)
        if name in specs:
            raise TrainingError(f"--grid: {name} appears twice")
        specs[name] = (cfg, replace(opts, **{GRID_KEYS[k][0]: v for k, v in combo.items() if GRID_KEYS[k][2] == "opt"}))
    return specs


def probe_configs(base_cfg: LAEConfig, features: tuple[str, ...] = PROBE_FEATURES,
                  l2_values: tuple[float, ...] = PROBE_L2) -> list[ProbeConfig]:
    return [ProbeConfig(dim=base_cfg.dim, tokens=base_cfg.tokens, groups=base_cfg.groups,
                        num_classes=base_cfg.num_classes, features=f, l2=l2, input_scale=base_cfg.input_scale)
            for f in features for l2 in l2_values]


def search_plan(model: str, grid: str | None, base_cfg: LAEConfig, opts: TrainOptions,
                probe_features: str = "both") -> tuple[dict[str, tuple[LAEConfig, TrainOptions]], list[ProbeConfig]]:
    """The members (adaptors) and fitted models (probes) of ``--model``/``--grid``; usage errors are
    ValueErrors, bad grid points TrainingErrors."""
    if model == "probe" and grid:
        raise ValueError("--grid varies the adaptor; --model probe has no adaptor (use --model auto)")
    combos = parse_grid(grid) if grid else ([] if model == "probe" else [{}])
    features = PROBE_FEATURES if probe_features == "both" else (probe_features,)
    probes = probe_configs(base_cfg, features) if model in ("probe", "auto") else []
    return member_specs(combos, base_cfg, opts), probes


# ---- the choice ----------------------------------------------------------------------------------------


def table(trainer: Trainer) -> list[dict[str, Any]]:
    rows = []
    for f in trainer.fitted:
        kind = kind_of(f.model)
        rows.append({"name": f.name, "kind": kind.name, "describe": describe(f.model),
                     "config": f.model.cfg.to_dict(), "val_acc": f.result.get("val_acc"),
                     "val_loss": f.result.get("val_loss"), "best_epoch": None,
                     "params": kind.parameter_count(f.model.cfg), "shipped_bytes": shipped_bytes_per_image(f.model),
                     "seconds": f.result["seconds"]})
    for m in trainer.members:
        rows.append({"name": m.name, "kind": m.model.kind, "describe": describe(m.model), "config": m.cfg.to_dict(),
                     "options": {"lr": m.opts.lr, "weight_decay": m.opts.weight_decay,
                                 "label_smoothing": m.opts.label_smoothing},
                     "val_acc": m.state["best_val"], "val_loss": m.state["best_loss"],
                     "best_epoch": m.state["best_epoch"], "epochs_trained": m.state["epochs_trained"],
                     "params": kind_of(m.model).parameter_count(m.cfg),
                     "shipped_bytes": shipped_bytes_per_image(m.model),
                     "seconds": m.state["seconds"]})
    return rows


def finish(trainer: Trainer, memory_bytes: int) -> dict[str, Any]:
    """Write every member's best to members/, the winner to best.safetensors and the table to grid.json."""
    rows = table(trainer)
    # best validation accuracy; ties: lower validation loss, then the earlier row (probes, then grid order)
    ranked = sorted(range(len(rows)), key=lambda i: (-(rows[i]["val_acc"] if rows[i]["val_acc"] is not None
                                                        else -math.inf), rows[i]["val_loss"] or 0.0, i))
    chosen = rows[ranked[0]]
    best_probe = next((rows[i] for i in ranked if rows[i]["kind"] == "probe"), None)
    best_lae = next((rows[i] for i in ranked if rows[i]["kind"] == "lae"), None)
    reason = f"highest validation accuracy ({chosen['val_acc']:.4f} on {len(trainer.val_rows)} rows)"
    other = best_lae if chosen["kind"] == "probe" else best_probe
    if other is not None:
        reason += f"; the best {other['kind']} ({other['name']}) validated {other['val_acc']:.4f}"
    classes, record = trainer.train_set.manifest.classes, feature_set_record(trainer.train_set)
    members_dir = trainer.run_dir / MEMBERS
    members_dir.mkdir(exist_ok=True)
    for f in trainer.fitted:
        save_checkpoint(members_dir / f"{f.name}.safetensors", model_checkpoint(f.model, classes, record))
    for m in trainer.members:
        best_model = kind_of(m.model).build(m.cfg, m.best)
        save_checkpoint(members_dir / f"{m.name}.safetensors", model_checkpoint(best_model, classes, record))
    save_checkpoint(trainer.run_dir / BEST, load_checkpoint(members_dir / f"{chosen['name']}.safetensors"))
    result = {"chosen": chosen["name"], "kind": chosen["kind"], "reason": reason,
              "train_rows": int(len(trainer.train_rows)), "val_rows": int(len(trainer.val_rows)),
              "epochs": trainer.opts.epochs, "elapsed_s": trainer.state["elapsed"],
              "memory_estimate_bytes": memory_bytes, "members": [rows[i] for i in ranked]}
    atomic_write_bytes(trainer.run_dir / GRID_TABLE, (json.dumps(result, indent=1) + "\n").encode())
    trainer.log(format_table(result))
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'model':<34} {'val acc':>8} {'val loss':>9} {'epoch':>5} {'params':>9} {'bytes/img':>10} "
             f"{'train s':>8}"]
    for r in result["members"]:
        acc = "" if r["val_acc"] is None else f"{r['val_acc']:.4f}"
        loss = "" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        epoch = "" if r["best_epoch"] is None else str(r["best_epoch"])
        mark = "*" if r["name"] == result["chosen"] else " "
        lines.append(f"{mark}{r['name']:<33} {acc:>8} {loss:>9} {epoch:>5} {r['params']:>9,} "
                     f"{r['shipped_bytes']:>10,} {r['seconds']:>8.1f}")
    lines.append(f"chosen: {result['chosen']} ({result['kind']}), {result['reason']}")
    return "\n".join(lines)


def run_search(run_dir: str, train_set: FeatureSet, val_set: FeatureSet | None, base_cfg: LAEConfig,
               members: dict[str, Any], fitted: list[ProbeConfig], opts: TrainOptions, patience: int,
               memory_bytes: int, resume: bool, overwrite: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Train the search, then choose; errors are one-line TrainingErrors (and ValueErrors for usage)."""
    trainer = Trainer(run_dir, train_set, val_set, base_cfg, opts, log=log, members=members, fitted=fitted,
                      search=True, patience=patience)
    log(f"training {len(members)} adaptors and {len(fitted)} probes together on {len(trainer.train_rows)} train / "
        f"{len(trainer.val_rows)} val rows; memory estimate {memory_bytes / 2**20:,.1f} MiB")
    trainer.fit(resume=resume, overwrite=overwrite)
    return finish(trainer, memory_bytes)

