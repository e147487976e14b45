"""``train --grid`` and ``--model probe|lae|auto``: which models a search trains, and which one it keeps.

A search is a run of device/train.py's one loop with many members. Every registered kind (device/kinds.py)
offers its candidates: the adaptor one per point of ``--grid`` (device/adaptor.py), the probe one per feature
kind and L2 strength (device/probe.py). Kinds trained by steps train side by side on batches prepared once;
fitted kinds are fitted before the first epoch. All members share the epochs, the batch size, the shuffle and
the validation split, so they differ only in what the grid varies.

The choice compares every model on equal terms: its *score*. A probe is fitted once, so its score is its
validation accuracy. An adaptor is validated at every epoch, and the best of thirty noisy epochs on a hundred
rows flatters it; its score is the mean validation accuracy of its last three epochs (device/search.py), where
the cosine schedule has settled. The highest score wins (ties: lower validation loss, then the simpler model:
probes before adaptors, in grid order). The winner is then refitted on every training row (device/refit.py)
and becomes the run's ``best.safetensors``; every member's best epoch is kept in ``members/``, and the table
(with the bytes per image the set ships) is printed and written to ``grid.json``.

``--model auto`` without ``--grid`` searches ``search.DEFAULT_SPACE`` by successive halving within
``--budget`` (device/search.py); with ``--grid`` every point trains to the end (the exhaustive search).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from mist.formats import FeatureSet, load_checkpoint, save_checkpoint
from mist.formats.atomic import atomic_write_bytes
from mist.formats.checkpoint import feature_set_record
from mist.formats.quant import bytes_per_row

from .kinds import KINDS, describe, kind_named, kind_of, model_checkpoint, shipped_bytes_per_image
from .lae import LAEConfig
from .refit import refit
from .run_state import BEST, GRID_TABLE, MEMBERS
from .search import Halving, score, skipped
from .train import Trainer, TrainOptions


def search_plan(model: str, base_cfg: LAEConfig, opts: TrainOptions, options: dict[str, Any]
                ) -> tuple[dict[str, tuple[Any, TrainOptions]], list[Any]]:
    """The members (kinds trained by steps: name -> (config, options)) and fitted configs of ``--model``
    (a kind's name, or "auto" for every kind) with ``options`` (the CLI's ``grid``, ``probe_features``, ...).
    Usage errors are ValueErrors, bad grid points TrainingErrors."""
    kinds = list(KINDS.values()) if model == "auto" else [kind_named(model)]
    if options.get("grid") and not any(k.takes_grid for k in kinds):
        raise ValueError(f"--grid varies the adaptor; --model {model} has no adaptor (use --model auto)")
    members: dict[str, tuple[Any, TrainOptions]] = {}
    fitted: list[Any] = []
    for kind in kinds:
        for name, cfg, changes in kind.candidates(base_cfg, options):
            if kind.trains == "steps":
                members[name] = (cfg, replace(opts, **changes))
            else:
                fitted.append(cfg)
    return members, fitted


# ---- the choice ----------------------------------------------------------------------------------------


def table(trainer: Trainer) -> list[dict[str, Any]]:
    rows = []
    for f in trainer.fitted:
        kind = kind_of(f.model)
        rows.append({"name": f.name, "kind": kind.name, "describe": describe(f.model),
                     "config": f.model.cfg.to_dict(), "score": f.result.get("val_acc"),
                     "val_acc": f.result.get("val_acc"),
                     "val_loss": f.result.get("val_loss"), "best_epoch": None,
                     "params": kind.parameter_count(f.model.cfg), "shipped_bytes": shipped_bytes_per_image(f.model),
                     "seconds": f.result["seconds"]})
    for m in trainer.members:
        rows.append({"name": m.name, "kind": m.model.kind, "describe": describe(m.model), "config": m.cfg.to_dict(),
                     "options": {"lr": m.opts.lr, "weight_decay": m.opts.weight_decay,
                                 "label_smoothing": m.opts.label_smoothing},
                     "score": score(m.state) if len(trainer.val_rows) else None,
                     "val_acc": m.state["best_val"], "val_loss": m.state["best_loss"],
                     "best_epoch": m.state["best_epoch"], "epochs_trained": m.state["epochs_trained"],
                     "stopped_by": m.state.get("stopped_by"),
                     "params": kind_of(m.model).parameter_count(m.cfg),
                     "shipped_bytes": shipped_bytes_per_image(m.model),
                     "seconds": m.state["seconds"]})
    return rows


def finish(trainer: Trainer, memory_bytes: int, refit_all: bool = True, resume: bool = False) -> dict[str, Any]:
    """Write every member's best to members/, the winner (refitted on every row) to best.safetensors and the
    table to grid.json."""
    rows = table(trainer)
    # best score; ties: lower validation loss, then the earlier row (probes, then grid order). Without
    # validation rows (a single model) the score is None for all and the order decides.
    ranked = sorted(range(len(rows)), key=lambda i: (-(rows[i]["score"] if rows[i]["score"] is not None
                                                       else -math.inf), rows[i]["val_loss"] or 0.0, i))
    chosen = rows[ranked[0]]
    reason = (f"highest score ({chosen['score']:.4f} on {len(trainer.val_rows)} validation rows)"
              if chosen["score"] is not None else "the only model")
    other = next((rows[i] for i in ranked if rows[i]["kind"] != chosen["kind"]), None)  # the best of another kind
    if other is not None and other["score"] is not None:
        reason += f"; the best {other['kind']} ({other['name']}) scored {other['score']:.4f}"
    classes, record = trainer.train_set.manifest.classes, feature_set_record(trainer.train_set)
    members_dir = trainer.run_dir / MEMBERS
    members_dir.mkdir(exist_ok=True)
    for f in trainer.fitted:
        save_checkpoint(members_dir / f"{f.name}.safetensors", model_checkpoint(f.model, classes, record))
    for m in trainer.members:
        best_model = kind_of(m.model).build(m.cfg, m.best)
        save_checkpoint(members_dir / f"{m.name}.safetensors", model_checkpoint(best_model, classes, record))
    refitted = None
    if refit_all and trainer.val_set is None and len(trainer.val_rows):
        final, refitted = refit(trainer, chosen, resume)
        save_checkpoint(trainer.run_dir / BEST, final)
    else:
        save_checkpoint(trainer.run_dir / BEST, load_checkpoint(members_dir / f"{chosen['name']}.safetensors"))
    m = trainer.train_set.manifest
    result = {"chosen": chosen["name"], "kind": chosen["kind"], "reason": reason,
              "train_rows": int(len(trainer.train_rows)), "val_rows": int(len(trainer.val_rows)),
              "epochs": trainer.opts.epochs, "elapsed_s": trainer.state["elapsed"], "refit": refitted,
              # what ships per image whichever model is chosen: the set holds every token of every map
              "set_bytes_per_image": bytes_per_row(m.dtype, m.row_shape),
              "skipped_for_budget": skipped(rows),
              "memory_estimate_bytes": memory_bytes, "members": [rows[i] for i in ranked]}
    atomic_write_bytes(trainer.run_dir / GRID_TABLE, (json.dumps(result, indent=1) + "\n").encode())
    trainer.log(format_table(result))
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'model':<34} {'score':>7} {'val acc':>8} {'val loss':>9} {'epoch':>5} {'params':>9} "
             f"{'bytes/img':>10} {'train s':>8}"]
    for r in result["members"]:
        sc = "" if r.get("score") is None else f"{r['score']:.4f}"
        acc = "" if r["val_acc"] is None else f"{r['val_acc']:.4f}"
        loss = "" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        epoch = "" if r["best_epoch"] is None else str(r["best_epoch"])
        mark = "*" if r["name"] == result["chosen"] else " "
        lines.append(f"{mark}{r['name']:<33} {sc:>7} {acc:>8} {loss:>9} {epoch:>5} {r['params']:>9,} "
                     f"{r['shipped_bytes']:>10,} {r['seconds']:>8.1f}")
    lines.append(f"chosen: {result['chosen']} ({result['kind']}), {result['reason']}")
    lines.append(f"the set ships {result['set_bytes_per_image']:,} bytes per image (bytes/img: what each model reads)")
    if result.get("skipped_for_budget"):
        lines.append(f"skipped for the budget: {', '.join(result['skipped_for_budget'])}")
    if result.get("refit"):
        r = result["refit"]
        lines.append(f"refitted on all {r['rows']} training rows"
                     + (f" for {r['epochs']} epochs" if "epochs" in r else "") + f" in {r['seconds']:.1f}s")
    return "\n".join(lines)


def run_search(run_dir: str, train_set: FeatureSet, val_set: FeatureSet | None, base_cfg: LAEConfig,
               members: dict[str, Any], fitted: list[Any], opts: TrainOptions, patience: int,
               memory_bytes: int, resume: bool, overwrite: bool, log: Callable[[str], None],
               budget: tuple[float, str] | None = None, refit_all: bool = True,
               progress: str = "none", log_every: int = 0) -> dict[str, Any]:
    """Train the search (halved within ``budget`` when one is given: the default search of --model auto),
    then choose and refit; errors are one-line TrainingErrors (and ValueErrors for usage)."""
    halving = Halving(opts.epochs, budget, log) if budget is not None and len(members) > 1 else None
    trainer = Trainer(run_dir, train_set, val_set, base_cfg, opts, log=log, members=members, fitted=fitted,
                      search=True, patience=patience, after_epoch=halving)
    log(f"training {_count(len(members), 'adaptor')} and {_count(len(fitted), 'probe')} together on "
        f"{len(trainer.train_rows)} train / {len(trainer.val_rows)} val rows; memory estimate "
        f"{memory_bytes / 2**20:,.1f} MiB")
    if halving is not None:
        log(f"successive halving after epochs {', '.join(map(str, halving.rungs))} of {opts.epochs}, within "
            f"{budget[0]:g}{'x one plain run' if budget[1] == 'x' else 's'} of adaptor training")
    bar = None
    if progress != "none":
        from .search import SearchProgress

        bar = SearchProgress(trainer, progress, halving, log_every=log_every, log=log)
    trainer.fit(resume=resume, overwrite=overwrite, progress=bar)
    return finish(trainer, memory_bytes, refit_all, resume)



def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
