"""``train --grid`` and ``--model probe|lae|auto``: many configurations from one pass over the data.

Every adaptor configuration of the grid trains side by side. Each minibatch is read from the shards, cast
and checked for NaN/inf once, then fed to every configuration in turn; the validation rows likewise, once per
epoch. All configurations share the epochs, the batch size, the shuffle (a pure function of seed and epoch)
and the validation split, so they differ only in what the grid varies. Probes (probe.py) are fitted full
batch before the first epoch, on features gathered in one read of the training and validation rows.

Each member keeps its best epoch on validation (early stopping by choice of epoch; ``patience`` also stops a
member that has not improved for that many epochs, which saves its compute). At the end the member with the
best validation accuracy (ties: lower validation loss, then the simpler model: probes before adaptors, in grid
order) becomes the run's ``best.safetensors``; every member's best is kept in ``members/``, and the table is
printed and written to ``grid.json``.

Resume: ``grid-last.safetensors`` holds every member's weights, AdamW moments, best weights and counters, the
fitted probes and the position in the epoch; it is rewritten atomically at every epoch end (and every
``save_every`` steps), so a run killed with kill -9 and resumed ends with the same weights as one never killed.

Memory grows with the number of configurations, not with the data: each member holds its weights five times
(weights, two AdamW moments, best copy, gradients); the activations of one member at a time; one batch; the
probes' features (rows x width, float32). ``memory_estimate`` adds these up and the CLI refuses a grid over
its ``--memory-limit``.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mist.formats import Checkpoint, FeatureSet, FormatError, load_checkpoint, save_checkpoint
from mist.formats.atomic import atomic_write_bytes
from mist.formats.checkpoint import feature_set_record
from mist.kit.machine import physical_memory

from .lae import LAE, LAEConfig, count_params, loss_and_grads
from .layers import softmax_cross_entropy
from .models import describe, make_lae, model_checkpoint, shipped_bytes_per_image
from .optim import AdamW, clip_grad_norm, lr_schedule
from .probe import Probe, ProbeConfig, fit_memory_bytes, fit_probe, probe_features, standardisation
from .schedule import warmup_steps
from .train import BEST, TrainingError, TrainOptions, read_finite, split_rows

GRID_STATE, GRID_TABLE, MEMBERS = "grid-last.safetensors", "grid.json", "members"
# grid key -> (field, type, which object it sets): the adaptor's config or the member's optimiser options
GRID_KEYS: dict[str, tuple[str, type, str]] = {
    "lr": ("lr", float, "opt"), "wd": ("weight_decay", float, "opt"), "ls": ("label_smoothing", float, "opt"),
    "blocks": ("blocks_per_group", int, "cfg"), "rank": ("rank", int, "cfg"), "heads": ("heads", int, "cfg"),
    "pos": ("pos_embed", bool, "cfg"),
}
PROBE_FEATURES = ("pooled", "flat")
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


@dataclass
class LAEMember:
    name: str
    cfg: LAEConfig
    opts: TrainOptions
    model: LAE
    optimizer: AdamW
    best: dict[str, np.ndarray]
    state: dict[str, Any] = field(default_factory=lambda: {
        "best_val": None, "best_loss": None, "best_epoch": 0, "bad_epochs": 0, "stopped": False,
        "loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0, "epochs_trained": 0})


@dataclass
class ProbeMember:
    name: str
    model: Probe
    result: dict[str, Any]


def memory_estimate(cfgs: list[LAEConfig], batch_size: int, probe_cfgs: list[ProbeConfig], rows: int) -> int:
    """Bytes the grid needs beyond the interpreter: see the module docstring for what is counted."""
    from .lae import param_shapes

    total = 0
    activations = 0
    for cfg in cfgs:
        weights = sum(int(np.prod(s)) for s in param_shapes(cfg).values())
        total += 5 * weights * 4
        T, d, r = cfg.tokens, cfg.dim, cfg.rank
        per_block = 3 * T * d + 5 * T * r + 2 * cfg.heads * T * T  # LN and attention caches, temporaries
        activations = max(activations, batch_size * (cfg.num_blocks * per_block + 4 * T * d) * 4)
    if cfgs:
        c = cfgs[0]
        total += activations + batch_size * c.groups * c.tokens * c.dim * 6  # the batch, fp16 and fp32
    widths = {p.features: p for p in probe_cfgs}
    for p in widths.values():  # probes of one feature kind share one array of features
        total += fit_memory_bytes(rows, p)
    return total


class GridTrainer:
    """Train ``combos`` (grid points over ``base_cfg``/``opts``) and ``probe_cfgs`` together; pick one."""

    def __init__(self, run_dir: str | Path, train_set: FeatureSet, val_set: FeatureSet | None, base_cfg: LAEConfig,
                 opts: TrainOptions, combos: list[dict[str, Any]], probe_cfgs: list[ProbeConfig],
                 patience: int = 0, log: Callable[[str], None] = print):
        self.run_dir, self.train_set, self.val_set = Path(run_dir), train_set, val_set
        self.opts, self.patience, self.log = opts, patience, log
        split_seed = opts.seed if opts.val_seed is None else opts.val_seed  # as the single-run trainer
        self.train_rows, self.val_rows = split_rows(train_set, opts.val_split, split_seed)
        if val_set is not None:
            self.val_rows = np.nonzero(val_set.labels >= 0)[0]
        if len(self.train_rows) == 0:
            raise TrainingError(f"{train_set.directory}: no labelled rows to train on")
        if len(self.val_rows) == 0 and len(combos) + len(probe_cfgs) > 1:
            raise TrainingError("choosing among several models needs validation rows: pass --val-split or --val")
        self.steps_per_epoch = math.ceil(len(self.train_rows) / opts.batch_size)
        self.total_steps = self.steps_per_epoch * opts.epochs
        self.warmup_steps, self.warmup_warning = warmup_steps(opts.warmup_epochs, opts.warmup_fraction,
                                                              self.steps_per_epoch, self.total_steps)
        self.members: list[LAEMember] = []
        seen_names: set[str] = set()
        for combo in combos:
            cfg_changes = {GRID_KEYS[k][0]: v for k, v in combo.items() if GRID_KEYS[k][2] == "cfg"}
            opt_changes = {GRID_KEYS[k][0]: v for k, v in combo.items() if GRID_KEYS[k][2] == "opt"}
            cfg = replace(base_cfg, **cfg_changes)
            try:
                cfg.validate()
            except ValueError as e:
                raise TrainingError(f"--grid point {member_name(combo)}: {e}") from None
            name = member_name(combo)
            if name in seen_names:
                raise TrainingError(f"--grid: {name} appears twice")
            seen_names.add(name)
            member_opts = replace(opts, **opt_changes)
            model = make_lae(cfg, opts.seed)
            optimizer = AdamW(model.params, lr=member_opts.lr, weight_decay=member_opts.weight_decay)
            self.members.append(LAEMember(name, cfg, member_opts, model, optimizer,
                                          {k: v.copy() for k, v in model.params.items()}))
        self.probe_cfgs = probe_cfgs
        self.probes: list[ProbeMember] = []
        self.state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "elapsed": 0.0}
        self.memory_bytes = memory_estimate([m.cfg for m in self.members], opts.batch_size, probe_cfgs,
                                            len(self.train_rows) + len(self.val_rows))

    # ---- probes ----

    def fit_probes(self) -> None:
        if not self.probe_cfgs:
            return
        t0 = time.perf_counter()
        x_train = self._gather(self.train_set, self.train_rows)
        x_val = self._gather(self.val_set or self.train_set, self.val_rows) if len(self.val_rows) else None
        y_train = self.train_set.labels[self.train_rows]
        y_val = (self.val_set or self.train_set).labels[self.val_rows]
        for features in PROBE_FEATURES:
            cfgs = [c for c in self.probe_cfgs if c.features == features]
            if not cfgs:
                continue
            f_train = probe_features(x_train, features, cfgs[0].input_scale)
            stats = standardisation(f_train)
            f_val = probe_features(x_val, features, cfgs[0].input_scale) if x_val is not None else None
            for cfg in cfgs:
                start = time.perf_counter()
                probe, report = fit_probe(cfg, f_train, y_train, stats)
                name = f"probe-{features}-l2-{cfg.l2:g}"
                if f_val is not None:
                    logits = (f_val - probe.params["mean"]) * probe.params["inv_std"] @ probe.params["weight"]
                    logits = logits + probe.params["bias"]
                    loss, _ = softmax_cross_entropy(logits.astype(np.float64), y_val)
                    report.update(val_acc=float(np.mean(logits.argmax(1) == y_val)), val_loss=float(loss))
                report["seconds"] = time.perf_counter() - start
                self.probes.append(ProbeMember(name, probe, report))
                self.log(f"{name}: {report['iterations']} L-BFGS iterations, val_acc "
                         f"{report.get('val_acc', float('nan')):.3f} ({report['seconds']:.1f}s)")
        self.state["elapsed"] += time.perf_counter() - t0

    def _gather(self, fs: FeatureSet, rows: np.ndarray) -> np.ndarray:
        parts = [read_finite(fs, rows[b:b + 256], np.float32) for b in range(0, len(rows), 256)]
        return np.concatenate(parts) if parts else np.zeros((0, *fs.row_shape), np.float32)

    # ---- checkpoints ----

    def grid_checkpoint(self) -> Checkpoint:
        params, optimizer = {}, {}
        for i, m in enumerate(self.members):
            for k, v in m.model.params.items():
                params[f"m{i}.{k}"] = v
                params[f"m{i}.best.{k}"] = m.best[k]
            for k, v in m.optimizer.state_dict().items():
                if k != "step":
                    optimizer[f"m{i}.{k}"] = v
        for i, p in enumerate(self.probes):
            for k, v in p.model.params.items():
                params[f"p{i}.{k}"] = v
        state = {**self.state, "options": asdict(self.opts), "patience": self.patience,
                 "members": [{"name": m.name, "config": m.cfg.to_dict(), "options": asdict(m.opts),
                              "state": m.state, "adam_step": m.optimizer.step_count} for m in self.members],
                 "probes": [{"name": p.name, "config": p.model.cfg.to_dict(), "result": p.result}
                            for p in self.probes]}
        return Checkpoint(params=params, config={"members": len(self.members), "probes": len(self.probes)},
                          classes=self.train_set.manifest.classes, feature_set=feature_set_record(self.train_set),
                          optimizer=optimizer, train_state=state, kind="grid")

    def resume(self, path: Path) -> None:
        try:
            self._resume(path)
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
            if isinstance(e, FormatError):
                raise
            raise FormatError(f"{path}: not a usable grid checkpoint ({e.__class__.__name__}: {e})") from None

    def _resume(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        if ckpt.kind != "grid" or not ckpt.resumable:
            raise FormatError(f"{path}: not a grid checkpoint")
        if ckpt.feature_set.get("fingerprint") != self.train_set.fingerprint:
            raise FormatError(f"{path}: was trained on a different feature set than {self.train_set.directory}")
        ts = ckpt.train_state
        saved_opts = {k: v for k, v in ts["options"].items() if k != "save_every"}
        if saved_opts != {k: v for k, v in asdict(self.opts).items() if k != "save_every"}:
            raise FormatError(f"{path}: was started with other training options; resume with the same ones")
        names = [m["name"] for m in ts["members"]]
        wanted = [m.name for m in self.members]
        probe_names = sorted(p["name"] for p in ts["probes"])
        if names != wanted or ts["patience"] != self.patience or len(ts["probes"]) != len(self.probe_cfgs) or \
                any(LAEConfig.from_dict(s["config"]) != m.cfg for s, m in zip(ts["members"], self.members)):
            raise FormatError(f"{path}: holds another grid ({', '.join(names + probe_names)}); "
                              "resume with the same --grid and --model")
        for i, (m, saved) in enumerate(zip(self.members, ts["members"])):
            for k in m.model.params:
                m.model.params[k][...] = ckpt.params[f"m{i}.{k}"]
                m.best[k][...] = ckpt.params[f"m{i}.best.{k}"]
            moments = {k[len(f"m{i}."):]: v for k, v in ckpt.optimizer.items() if k.startswith(f"m{i}.")}
            m.optimizer.load_state_dict({**moments, "step": saved["adam_step"]})
            m.state = saved["state"]
        self.probes = []
        for i, saved in enumerate(ts["probes"]):
            cfg = ProbeConfig.from_dict(saved["config"])
            params = {k: ckpt.params[f"p{i}.{k}"] for k in ("mean", "inv_std", "weight", "bias")}
            self.probes.append(ProbeMember(saved["name"], Probe(cfg, params), saved["result"]))
        self.state = {k: ts[k] for k in ("epoch", "batch", "step", "elapsed")}

    # ---- the loop ----

    def fit(self, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state_path = self.run_dir / GRID_STATE
        if resume and state_path.exists():
            self.resume(state_path)
            self.log(f"resumed the grid from {state_path} at epoch {self.state['epoch'] + 1}, "
                     f"step {self.state['step']}")
        elif not resume and not overwrite and (state_path.exists() or (self.run_dir / BEST).exists()):
            raise TrainingError(f"{self.run_dir} already holds a run; pass --resume to continue it "
                                "or --overwrite to start again")
        if len(self.probes) != len(self.probe_cfgs):
            self.fit_probes()
            save_checkpoint(state_path, self.grid_checkpoint())
        opts = self.opts
        while self.state["epoch"] < opts.epochs and any(not m.state["stopped"] for m in self.members):
            self._epoch()
        return self.finish()

    def _epoch(self) -> None:
        opts, epoch = self.opts, self.state["epoch"]
        order = self.train_rows[np.random.default_rng([opts.seed, epoch]).permutation(len(self.train_rows))]
        active = [m for m in self.members if not m.state["stopped"]]
        t0 = time.perf_counter()
        for b in range(self.state["batch"], self.steps_per_epoch):
            rows = order[b * opts.batch_size:(b + 1) * opts.batch_size]
            x, y = read_finite(self.train_set, rows, np.float32), self.train_set.labels[rows]  # once for all
            for m in active:
                start = time.perf_counter()
                with np.errstate(over="ignore", invalid="ignore"):
                    loss, grads, logits = loss_and_grads(m.model, x, y, m.opts.label_smoothing)
                m.model._cache = None  # free this member's activations before the next member's forward
                if not math.isfinite(loss):
                    raise TrainingError(f"{m.name}: non-finite loss at epoch {epoch + 1}, step "
                                        f"{self.state['step']} (try a lower lr in --grid)")
                clip_grad_norm(grads, m.opts.grad_clip)
                lr = lr_schedule(self.state["step"], self.total_steps, m.opts.lr, self.warmup_steps, m.opts.min_lr)
                m.optimizer.step(grads, lr=lr)
                m.state["loss_sum"] += float(loss) * len(rows)
                m.state["correct"] += int(np.sum(logits.argmax(1) == y))
                m.state["seen"] += len(rows)
                m.state["seconds"] += time.perf_counter() - start
            self.state["step"] += 1
            self.state["batch"] = b + 1
            if opts.save_every and self.state["step"] % opts.save_every == 0 and b + 1 < self.steps_per_epoch:
                self.state["elapsed"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                save_checkpoint(self.run_dir / GRID_STATE, self.grid_checkpoint())
        self._validate(active, epoch)
        self.state.update(epoch=epoch + 1, batch=0)
        self.state["elapsed"] += time.perf_counter() - t0
        save_checkpoint(self.run_dir / GRID_STATE, self.grid_checkpoint())
        leader = max(active, key=lambda m: (m.state["best_val"] or -1.0, -(m.state["best_loss"] or 0.0)))
        self.log(f"epoch {epoch + 1}/{self.opts.epochs}: {len(active)} adaptors trained, best so far "
                 f"{leader.name} val_acc {leader.state['best_val']:.3f}" if leader.state["best_val"] is not None
                 else f"epoch {epoch + 1}/{self.opts.epochs}: {len(active)} adaptors trained")

    def _validate(self, active: list[LAEMember], epoch: int) -> None:
        fs = self.val_set or self.train_set
        loss_sum = {m.name: 0.0 for m in active}
        correct = {m.name: 0 for m in active}
        for begin in range(0, len(self.val_rows), 128):
            rows = self.val_rows[begin:begin + 128]
            x, y = read_finite(fs, rows, np.float32), fs.labels[rows]  # read once, fed to every member
            for m in active:
                logits = m.model.forward(x, keep_cache=False)
                loss, _ = softmax_cross_entropy(logits, y)
                loss_sum[m.name] += float(loss) * len(rows)
                correct[m.name] += int(np.sum(logits.argmax(1) == y))
        n = max(len(self.val_rows), 1)
        for m in active:
            s = m.state
            s["epochs_trained"] = epoch + 1
            if len(self.val_rows):
                acc, loss = correct[m.name] / n, loss_sum[m.name] / n
            else:  # a single member without validation: best is the lowest training loss
                acc, loss = -s["loss_sum"] / max(s["seen"], 1), s["loss_sum"] / max(s["seen"], 1)
            s["last_train_loss"] = s["loss_sum"] / max(s["seen"], 1)
            s.update(loss_sum=0.0, correct=0, seen=0)
            if s["best_val"] is None or acc > s["best_val"]:
                s.update(best_val=acc, best_loss=loss, best_epoch=epoch + 1, bad_epochs=0)
                for k, v in m.model.params.items():
                    m.best[k][...] = v
            else:
                s["bad_epochs"] += 1
                if self.patience and s["bad_epochs"] >= self.patience:
                    s["stopped"] = True
                    self.log(f"{m.name}: no better on validation for {self.patience} epochs; stopped "
                             f"after epoch {epoch + 1}")

    # ---- the choice ----

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for p in self.probes:
            rows.append({"name": p.name, "kind": "probe", "describe": describe(p.model),
                         "config": p.model.cfg.to_dict(), "val_acc": p.result.get("val_acc"),
                         "val_loss": p.result.get("val_loss"), "best_epoch": None,
                         "params": int(p.model.cfg.width * p.model.cfg.num_classes + p.model.cfg.num_classes),
                         "shipped_bytes": shipped_bytes_per_image(p.model), "seconds": p.result["seconds"]})
        for m in self.members:
            rows.append({"name": m.name, "kind": "lae", "describe": describe(m.model), "config": m.cfg.to_dict(),
                         "options": {"lr": m.opts.lr, "weight_decay": m.opts.weight_decay,
                                     "label_smoothing": m.opts.label_smoothing},
                         "val_acc": m.state["best_val"], "val_loss": m.state["best_loss"],
                         "best_epoch": m.state["best_epoch"], "epochs_trained": m.state["epochs_trained"],
                         "params": count_params(m.model.params), "shipped_bytes": shipped_bytes_per_image(m.model),
                         "seconds": m.state["seconds"]})
        return rows

    def finish(self) -> dict[str, Any]:
        rows = self.table()
        # best validation accuracy; ties: lower validation loss, then the earlier row (probes, then grid order)
        ranked = sorted(range(len(rows)), key=lambda i: (-(rows[i]["val_acc"] if rows[i]["val_acc"] is not None
                                                            else -math.inf), rows[i]["val_loss"] or 0.0, i))
        chosen = rows[ranked[0]]
        best_probe = next((rows[i] for i in ranked if rows[i]["kind"] == "probe"), None)
        best_lae = next((rows[i] for i in ranked if rows[i]["kind"] == "lae"), None)
        reason = f"highest validation accuracy ({chosen['val_acc']:.4f} on {len(self.val_rows)} rows)"
        other = best_lae if chosen["kind"] == "probe" else best_probe
        if other is not None:
            reason += f"; the best {other['kind']} ({other['name']}) validated {other['val_acc']:.4f}"
        classes, record = self.train_set.manifest.classes, feature_set_record(self.train_set)
        members_dir = self.run_dir / MEMBERS
        members_dir.mkdir(exist_ok=True)
        for p in self.probes:
            save_checkpoint(members_dir / f"{p.name}.safetensors", model_checkpoint(p.model, classes, record))
        for m in self.members:
            best_model = LAE(m.cfg, m.best)
            save_checkpoint(members_dir / f"{m.name}.safetensors", model_checkpoint(best_model, classes, record))
        chosen_path = members_dir / f"{chosen['name']}.safetensors"
        save_checkpoint(self.run_dir / BEST, load_checkpoint(chosen_path))
        table = {"chosen": chosen["name"], "kind": chosen["kind"], "reason": reason,
                 "train_rows": int(len(self.train_rows)), "val_rows": int(len(self.val_rows)),
                 "epochs": self.opts.epochs, "elapsed_s": self.state["elapsed"],
                 "memory_estimate_bytes": self.memory_bytes, "members": [rows[i] for i in ranked]}
        atomic_write_bytes(self.run_dir / GRID_TABLE, (json.dumps(table, indent=1) + "\n").encode())
        self.log(format_table(table))
        return table


def format_table(table: dict[str, Any]) -> str:
    lines = [f"{'model':<34} {'val acc':>8} {'val loss':>9} {'epoch':>5} {'params':>9} {'bytes/img':>10} "
             f"{'train s':>8}"]
    for r in table["members"]:
        acc = "" if r["val_acc"] is None else f"{r['val_acc']:.4f}"
        loss = "" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        epoch = "" if r["best_epoch"] is None else str(r["best_epoch"])
        mark = "*" if r["name"] == table["chosen"] else " "
        lines.append(f"{mark}{r['name']:<33} {acc:>8} {loss:>9} {epoch:>5} {r['params']:>9,} "
                     f"{r['shipped_bytes']:>10,} {r['seconds']:>8.1f}")
    lines.append(f"chosen: {table['chosen']} ({table['kind']}), {table['reason']}")
    return "\n".join(lines)


def probe_configs(base_cfg: LAEConfig, features: tuple[str, ...] = PROBE_FEATURES,
                  l2_values: tuple[float, ...] = PROBE_L2) -> list[ProbeConfig]:
    return [ProbeConfig(dim=base_cfg.dim, tokens=base_cfg.tokens, groups=base_cfg.groups,
                        num_classes=base_cfg.num_classes, features=f, l2=l2, input_scale=base_cfg.input_scale)
            for f in features for l2 in l2_values]


def run_grid(run_dir: str, train_set: FeatureSet, val_set: FeatureSet | None, base_cfg: LAEConfig,
             opts: TrainOptions, model: str, grid: str | None, patience: int, memory_limit_mib: float | None,
             resume: bool, overwrite: bool, log: Callable[[str], None],
             probe_features: str = "both") -> dict[str, Any]:
    """What ``mist-device train`` does for --grid or --model probe|auto; errors are one-line ValueErrors
    (usage) or TrainingErrors."""
    if model == "probe" and grid:
        raise ValueError("--grid varies the adaptor; --model probe has no adaptor (use --model auto)")
    combos = parse_grid(grid) if grid else ([] if model == "probe" else [{}])
    features = PROBE_FEATURES if probe_features == "both" else (probe_features,)
    probes = probe_configs(base_cfg, features) if model in ("probe", "auto") else []
    trainer = GridTrainer(run_dir, train_set, val_set, base_cfg, opts, combos, probes, patience, log)
    limit = memory_limit_mib * 2**20 if memory_limit_mib else (physical_memory() or 4 << 30) / 2
    if trainer.memory_bytes > limit:
        raise TrainingError(f"--grid: {len(combos)} adaptors and {len(probes)} probes need about "
                            f"{trainer.memory_bytes / 2**20:,.0f} MiB, more than the limit of {limit / 2**20:,.0f} MiB "
                            "(--memory-limit); use fewer grid values or a smaller --batch-size")
    log(f"training {len(combos)} adaptors and {len(probes)} probes together on {len(trainer.train_rows)} train / "
        f"{len(trainer.val_rows)} val rows; memory estimate {trainer.memory_bytes / 2**20:,.1f} MiB")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    return trainer.fit(resume=resume, overwrite=overwrite)
