"""The refit after a search: the chosen configuration, trained again on every training row.

A search holds out ``--val-split`` of the rows to choose a configuration (and, for an adaptor, how many epochs
of the cosine schedule it trained). Once chosen, those rows have done their job; like the VTAB-1k protocol,
the final model is trained on all of them:

    probe      the chosen config (features, L2) fitted on every row, its standardisation included; the L2
               per row scales by (fit rows / all rows), which keeps the penalty against the summed loss
    adaptor    a plain run of the chosen config and options in RUN_DIR/refit/, on every row, with the same
               schedule (``--epochs`` long) stopped after the epochs the member trained in the search; its last
               epoch is the model (there are no validation rows left to pick another)

The refit's plain run writes its own state (refit/last.safetensors), so ``--resume`` after kill -9 continues it
where it stopped. ``--no-refit`` keeps the member's best epoch from the search instead. With ``--val`` (a
separate validation set) the search already trained on every training row, and nothing is refitted.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from mist.formats import Checkpoint
from mist.formats.checkpoint import feature_set_record

from .data import read_rows
from .kinds import kind_named, model_checkpoint

REFIT_DIR = "refit"


def refit(trainer: Any, chosen: dict[str, Any], resume: bool) -> tuple[Checkpoint, dict[str, Any]]:
    """The checkpoint of ``chosen`` (a grid.json row) refitted on every training row, and its record."""
    from .train import Trainer

    t0 = time.perf_counter()
    rows = np.sort(np.concatenate([trainer.train_rows, trainer.val_rows]))
    classes, record = trainer.train_set.manifest.classes, feature_set_record(trainer.train_set)
    kind = kind_named(chosen["kind"])
    if kind.trains == "fit":
        cfg = next(f.model.cfg for f in trainer.fitted if f.name == chosen["name"])
        # The penalty per row (l2 = 1 / (N C)) shrinks with more rows, as scikit-learn's fixed C does: the
        # weights' prior stays as strong against the whole sum of losses as it was on the fit rows.
        cfg = replace(cfg, l2=cfg.l2 * len(trainer.train_rows) / len(rows))
        x, y = read_rows(trainer.train_set, rows), trainer.train_set.labels[rows]
        [(_, model, report)] = kind.fit([cfg], x, y, None, np.empty(0, dtype=np.int64), log=trainer.log)
        info = {"rows": int(len(rows)), "seconds": time.perf_counter() - t0, "iterations": report["iterations"]}
        return model_checkpoint(model, classes, record), info
    member = next(m for m in trainer.members if m.name == chosen["name"])
    epochs = int(member.state["epochs_trained"])
    run_dir = trainer.run_dir / REFIT_DIR
    again = Trainer(run_dir, trainer.train_set, None, member.cfg, replace(member.opts, val_split=0.0, val_seed=None),
                    log=trainer.log)
    trainer.log(f"refit: {chosen['name']} on all {len(again.train_rows)} training rows for {epochs} of "
                f"{member.opts.epochs} epochs, in {run_dir}")
    again.fit(resume=resume, overwrite=not resume, until=epochs)
    info = {"rows": int(len(again.train_rows)), "epochs": epochs, "seconds": again.state["elapsed"],
            "run_dir": str(run_dir)}
    return model_checkpoint(again.model, classes, record), info
