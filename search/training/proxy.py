"""Proxy training of one candidate with Ultralytics' own trainer, inside a worker; returns plain data."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import modules
from space import first_line, inherit

from ..errors import disk_fault

# Arguments the engine sets itself; --train-arg may not override them.
RESERVED_ARGS = frozenset({"model", "data", "epochs", "imgsz", "batch", "fraction", "seed", "device", "project",
                           "name", "exist_ok", "plots", "save", "val", "workers", "verbose", "resume", "mode", "task",
                           "deterministic", "pretrained", "cfg"})
FAULTS = ("raise", "die", "nan", "hang", "oom")
DISK_FULL = "disk-full"  # error_kind of a training the disk refused (no space, quota, read-only)

FAITHFUL = {"fresh_lr_mult": 1.0, "fresh_init": None}  # the recipe settings as the papers' code trains a layer


@dataclass(frozen=True)
class ProxySchedule:
    """The short training every candidate gets; equal schedules make results comparable (the fidelity)."""

    epochs: int
    imgsz: int
    batch: int
    fraction: float | int | tuple = 1.0
    seed: int = 0
    train_args: tuple[tuple[str, Any], ...] = ()  # further Ultralytics train arguments, sorted by name
    # How layers the base does not have (inserted or replacing) are trained when the rest inherits the base:
    # their learning rate is fresh_lr_mult x the inherited layers' (and their 1-d parameters, layer scales among
    # them, skip weight decay); fresh_init opens their residual gates (modules.residual_gates) to this value
    # instead of the papers' zero (None: as the papers start them).
    fresh_lr_mult: float = 1.0
    fresh_init: float | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fraction"] = list(self.fraction) if isinstance(self.fraction, tuple) else self.fraction
        d["train_args"] = dict(self.train_args)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProxySchedule":
        """The inverse of :meth:`as_dict` (as a study stores it). A study recorded before a recipe setting existed
        trained with the papers' recipe (FAITHFUL)."""
        fraction = tuple(d["fraction"]) if isinstance(d["fraction"], list) else d["fraction"]
        return cls(epochs=d["epochs"], imgsz=d["imgsz"], batch=d["batch"], fraction=fraction, seed=d["seed"],
                   train_args=tuple(sorted(d["train_args"].items())),
                   **{k: d.get(k, v) for k, v in FAITHFUL.items()})

    def key(self) -> str:
        """Short stable id of this fidelity: trials with equal keys (and equal candidates) are interchangeable.
        Recipe settings at their FAITHFUL values are left out, so studies from before they existed keep their key."""
        d = {k: v for k, v in self.as_dict().items() if not (k in FAITHFUL and v == FAITHFUL[k])}
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def faithful(self) -> bool:
        return all(getattr(self, k) == v for k, v in FAITHFUL.items())

    def ultralytics_args(self) -> dict[str, Any]:
        fraction = list(self.fraction) if isinstance(self.fraction, tuple) else self.fraction
        return {"epochs": self.epochs, "imgsz": self.imgsz, "batch": self.batch, "fraction": fraction,
                "seed": self.seed, "deterministic": True, **dict(self.train_args)}


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs for one proxy training (plain, picklable data)."""

    trial: int
    candidate_hash: str
    yaml_text: str
    data: str
    schedule: ProxySchedule
    run_dir: str
    device: str = "cpu"  # Ultralytics device string: "cpu" or "0" (the first GPU Ray made visible)
    threads: int = 1
    save_weights: bool = False
    fault: str | None = None  # test hook: one of FAULTS, injected into this trial
    attempt: int = 0
    weights: str | None = None  # base state dict to inherit (search/weights.py), None = from scratch
    base_layers: tuple[tuple[int, int], ...] = ()  # Candidate.base_layers: base index -> candidate index
    skip_keys: tuple[str, ...] = ()  # base tensors not to inherit (class branch of another class count)
    # Multi-fidelity rungs: the schedule's epochs are the top rung's, so every rung follows the top rung's learning
    # rate schedule; ``stop_at`` ends this training after that many epochs (validated, checkpoint kept), and
    # ``resume`` continues a stopped one from its checkpoint (weights, EMA, optimizer, epoch).
    stop_at: int | None = None
    resume: str | None = None
    # Validate every this many epochs as well as after the last (0: the last only). The base training uses it so a
    # person sees its mAP grow; the random streams validation draws from are restored, so the weights stay the same.
    val_every: int = 0

    @property
    def tag(self) -> str:
        """This attempt's name at the latency gate."""
        return f"{self.trial}.{self.attempt}.{self.schedule.seed}"  # confirmation runs differ by seed only


@dataclass
class TrainResult:
    """What a proxy training produced; ``error`` set means the trial failed (``error_kind`` says how)."""

    map50_95: float | None = None
    map50: float | None = None
    train_s: float = 0.0
    error: str | None = None
    error_kind: str | None = None  # "exception", "diverged", "oom", "timeout", "worker-died"
    traceback: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


def run_training(job: TrainJob, checkpoint: Callable[[], None] | None = None) -> TrainResult:
    """Train ``job``'s candidate and validate it once at the end; never raises (errors come back as data).

    ``checkpoint`` is called before every training and validation batch; the latency gate uses it to park this
    training while a latency measurement needs the device to itself.
    """
    import torch

    modules.register()  # registration is per process: every worker must do it before building a candidate
    torch.set_num_threads(max(1, job.threads))
    run_dir = Path(job.run_dir)
    start = time.perf_counter()
    log = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = _trial_log(run_dir / "train.log")
        _inject(job)
        metrics, extra = _train(job, run_dir, checkpoint)
        return TrainResult(map50_95=float(metrics["metrics/mAP50-95(B)"]), map50=float(metrics["metrics/mAP50(B)"]),
                           train_s=time.perf_counter() - start, extra=extra)
    except Diverged as err:
        return _failure("diverged", str(err), start)
    except Exception as err:  # a failing trial is recorded, never fatal to the study
        full = disk_fault(err, "writing a training's files (its rung checkpoint, logs)", run_dir, "free space there")
        if full is not None:  # not the candidate's fault: the driver stops and keeps it for the resume
            return _failure(DISK_FULL, str(full), start, traceback.format_exc())
        kind = "oom" if _is_oom(err) else "exception"
        return _failure(kind, f"{type(err).__name__}: {first_line(err)[:500]}", start, traceback.format_exc())
    finally:
        if log is not None:
            logging.getLogger("ultralytics").removeHandler(log)
            log.close()


def _train(job: TrainJob, run_dir: Path, checkpoint: Callable[[], None] | None) -> tuple[dict, dict]:
    restarted = unusable_checkpoint(job.resume) if job.resume else None
    if restarted:  # the rung is trained again from the start (inheriting the base), not lost
        job = replace(job, resume=None)
    yaml_path = run_dir / f"candidate-{job.candidate_hash}.yaml"
    yaml_path.write_text(job.yaml_text)
    stops_early = job.stop_at is not None and job.stop_at < job.schedule.epochs
    # The trainer is used directly (Ultralytics' documented DetectionTrainer(overrides=...).train()): YOLO.train()
    # insists on reloading a saved checkpoint afterwards, and weights are off by default.
    trainer_cls = _proxy_trainer(checkpoint, job.save_weights or stops_early, job.fault,
                                 None if job.resume else _inheritor(job), job.stop_at, keep_best=job.save_weights,
                                 recipe=_fresh_recipe(job), val_every=job.val_every)
    if job.resume:
        # Ultralytics' own resume: the checkpoint's train arguments (schedule, data, seed) with its weights, EMA,
        # optimizer and epoch; only where it writes and what it runs on may change.
        args = {"resume": job.resume, "save_dir": str(run_dir), "device": job.device, "workers": 0,
                "val": job.val_every > 0,
                "plots": False}
    else:
        args = {"model": str(yaml_path), "data": job.data, "device": job.device, "project": str(run_dir.parent),
                "name": run_dir.name, "exist_ok": True, "plots": False, "val": job.val_every > 0,
                "save": job.save_weights or stops_early, "workers": 0, "verbose": False, "pretrained": False,
                **job.schedule.ultralytics_args()}
    trainer = trainer_cls(overrides=args)
    trainer.train()
    metrics = dict(trainer.metrics or {})
    if not all(map(_finite, (metrics.get("metrics/mAP50-95(B)"), metrics.get("metrics/mAP50(B)")))):
        raise Diverged(f"validation metrics are not finite: {metrics}")
    inherited = getattr(trainer, "inheritance", None)
    extra = inherited.as_dict() if inherited is not None else {}
    extra["data_order"] = trainer.data_seen.hexdigest()[:16]
    if trainer.fresh_groups:
        extra["param_groups"] = trainer.fresh_groups
    if trainer.opened_gates:
        extra["opened_gates"] = trainer.opened_gates
    if job.stop_at is not None or job.resume:
        extra.update({"epochs_done": trainer.epoch + 1, "start_epoch": trainer.start_epoch, "lr": trainer.lr_log,
                      "state_at_start": trainer.state_at_start, "state_at_end": state_digest(trainer)})
        if stops_early:
            extra["checkpoint"] = str(trainer.last)
    if restarted:
        extra["rung_restarted"] = restarted
    return metrics, extra


def unusable_checkpoint(path: str) -> str | None:
    """Why the rung checkpoint at ``path`` cannot be continued from (missing, truncated, not a training
    checkpoint), or None when it can."""
    import torch

    if not Path(path).is_file():
        return f"its rung checkpoint {path} is missing"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated zip, a disk error: any reason not to continue from it
        return f"its rung checkpoint {path} is unreadable ({type(err).__name__}: {first_line(err)[:200]})"
    if not isinstance(ckpt, dict) or ckpt.get("epoch", -1) < 0 or "optimizer" not in ckpt:
        return f"its rung checkpoint {path} is not a checkpoint to continue from"
    return None


def state_digest(trainer) -> dict[str, str]:
    """Short content hashes of what a continued training must restore: weights, EMA, optimizer state."""
    import torch

    def digest(tensors) -> str:
        h = hashlib.sha256()
        for t in tensors:
            if isinstance(t, torch.Tensor):
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    opt = trainer.optimizer.state_dict()["state"]
    return {"model": digest(trainer.model.state_dict().values()), "ema": digest(trainer.ema.ema.state_dict().values()),
            "optimizer": digest(v for k in sorted(opt) for v in opt[k].values())}


def _inheritor(job: TrainJob) -> Callable | None:
    """A function giving a freshly built candidate model the base weights, or None (train from scratch)."""
    if job.weights is None:
        return None

    def give(model):
        import torch

        state = torch.load(job.weights, map_location="cpu", weights_only=True)
        return inherit(model, job.base_layers, state, job.skip_keys)

    return give


@dataclass(frozen=True)
class FreshRecipe:
    """How the layers a candidate does not inherit train (ProxySchedule's recipe settings), with which they are."""

    inherited: frozenset[int]  # candidate layer indices that hold base weights; every other layer is fresh
    lr_mult: float
    init: float | None


def _fresh_recipe(job: TrainJob) -> FreshRecipe | None:
    """None when nothing is inherited (from scratch every layer is fresh) or the recipe is the papers' own."""
    if job.weights is None or job.schedule.faithful:
        return None
    return FreshRecipe(frozenset(j for _, j in job.base_layers), job.schedule.fresh_lr_mult, job.schedule.fresh_init)


def _layer_of(name: str) -> int:
    """The top-level layer index of a DetectionModel parameter name (``model.16.cv1.weight`` -> 16)."""
    return int(name.split(".")[1])


def split_fresh_groups(optimizer, model, recipe: FreshRecipe) -> list[dict[str, Any]]:
    """Move the fresh layers' parameters of each of Ultralytics' groups into a group of their own at
    ``lr_mult`` x its rate (same kind, so warm-up treats it alike), their 1-d weights (layer scales) without weight
    decay. The same model always gives the same groups in the same order, so a resumed optimizer state fits.
    Returns a description of every group (kind, fresh, weight decay, size)."""
    layer = {id(p): _layer_of(n) for n, p in model.named_parameters()}
    for group in list(optimizer.param_groups):
        fresh = [p for p in group["params"] if layer[id(p)] not in recipe.inherited]
        if not fresh:
            continue
        group["params"] = [p for p in group["params"] if layer[id(p)] in recipe.inherited]
        options = {k: v for k, v in group.items() if k not in ("params", "initial_lr")}
        options.update(lr=group["lr"] * recipe.lr_mult, fresh=True)
        scales = [p for p in fresh if p.ndim <= 1] if group["weight_decay"] else []
        rest = [p for p in fresh if all(p is not s for s in scales)]
        for params, decay in ((rest, group["weight_decay"]), (scales, 0.0)):
            if params:
                optimizer.add_param_group({**options, "params": params, "weight_decay": decay})
    return [{"param_group": g.get("param_group"), "fresh": bool(g.get("fresh")), "weight_decay": g["weight_decay"],
             "params": len(g["params"])} for g in optimizer.param_groups]


def open_gates(model, recipe: FreshRecipe) -> int:
    """Set the residual gates of every fresh layer to ``recipe.init``; returns how many tensors were set."""
    import torch

    opened = 0
    with torch.no_grad():
        for i, layer in enumerate(model.model):
            if i not in recipe.inherited:
                for gate in modules.residual_gates(layer):
                    gate.fill_(recipe.init)
                    opened += 1
    return opened


def _proxy_trainer(checkpoint: Callable[[], None] | None, save_weights: bool, fault: str | None,
                   inheritor: Callable | None = None, stop_at: int | None = None, keep_best: bool = True,
                   recipe: FreshRecipe | None = None, val_every: int = 0) -> type:
    """Ultralytics' DetectionTrainer with the proxy's differences, as a subclass (the API Ultralytics offers)."""
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import callbacks as ucallbacks

    class ProxyTrainer(DetectionTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Only Ultralytics' default callbacks: no analytics, hub, platform or Ray Tune reporting from workers.
            self.callbacks = ucallbacks.get_default_callbacks()
            self.add_callback("on_train_batch_end", _stop_on_nan)
            if checkpoint is not None:
                self.add_callback("on_train_batch_start", lambda trainer: checkpoint())
                self.add_callback("on_val_batch_start", lambda validator: checkpoint())
            if fault == "nan":
                self.add_callback("on_train_batch_start", _poison_weights)
            self.lr_log: list[list[float]] = []  # each parameter group's learning rate at the end of each epoch
            self.fresh_groups: list[dict[str, Any]] = []
            self.opened_gates = 0
            self.data_seen = hashlib.sha256()  # the training batches in order, as the loader gave them
            self.state_at_start: dict[str, str] = {}
            self.add_callback("on_train_start", _record_start)
            self.add_callback("on_train_epoch_end", lambda t: t.lr_log.append([g["lr"] for g in t.optimizer.param_groups]))
            if stop_at is not None:
                self.add_callback("on_train_epoch_end", lambda t: _stop_after(t, stop_at))

        def get_model(self, cfg=None, weights=None, verbose=True):
            model = super().get_model(cfg=cfg, weights=weights, verbose=verbose)
            if inheritor is not None:  # before the optimizer and EMA are made from the model
                self.inheritance = inheritor(model)
                if recipe is not None and recipe.init is not None:  # a new training only; a resumed one has trained
                    self.opened_gates = open_gates(model, recipe)
            return model

        def preprocess_batch(self, batch: dict) -> dict:
            # The paired score relies on it: one seed gives every candidate and the base the same images,
            # augmented alike, in the same order, whatever their layers draw from the random generators.
            self.data_seen.update("\n".join(batch["im_file"]).encode())
            self.data_seen.update(batch["img"].cpu().contiguous().numpy().tobytes())
            return super().preprocess_batch(batch)

        def build_optimizer(self, model, *args, **kwargs):
            optimizer = super().build_optimizer(model, *args, **kwargs)
            if recipe is not None:
                self.fresh_groups = split_fresh_groups(optimizer, model, recipe)
            return optimizer

        def save_model(self):
            # Weights are optional (--save-weights); skipping the write saves ~13 MB and some time per trial.
            if not save_weights:
                return False
            saved = super().save_model()
            if not keep_best:  # a rung checkpoint needs last.pt only; best.pt (30-50 MB) would outlive the candidate
                self.best.unlink(missing_ok=True)
            return saved

        def validate(self):
            # Ultralytics validates every epoch or only the last; between them, the last results stand.
            if val_every > 1 and (self.epoch + 1) % val_every and self.epoch + 1 < self.epochs:
                return self.metrics, self.fitness
            with _random_streams_kept():  # the validation loader draws from them: the training must not notice
                return super().validate()

        def final_eval(self):
            # The proxy score is the final epoch's validation; re-validating best.pt would double validation time.
            return None

    return ProxyTrainer


@contextlib.contextmanager
def _random_streams_kept():
    """Python's, NumPy's and torch's global random states restored on exit."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def epochs_written(job: TrainJob) -> tuple[int, tuple[int, float] | None]:
    """How many epochs a running training has finished (Ultralytics writes a row of ``results.csv`` per epoch) and
    (epoch, mAP50-95) of its latest validation under ``job.val_every`` (None before the first)."""
    rows = []
    with contextlib.suppress(OSError):  # not written before its first epoch ends
        rows = list(csv.DictReader((Path(job.run_dir) / "results.csv").read_text().splitlines()))
    validated = len(rows) - len(rows) % job.val_every if job.val_every else 0
    if not validated:  # the rows between validations repeat the last one's metrics
        return len(rows), None
    try:
        return len(rows), (validated, float(rows[validated - 1]["metrics/mAP50-95(B)"]))
    except (KeyError, ValueError):  # a row being written
        return len(rows), None


def _record_start(trainer) -> None:
    """The state training starts from (after a resume: what the checkpoint restored)."""
    trainer.state_at_start = state_digest(trainer)


def _stop_after(trainer, epochs: int) -> None:
    # Set before Ultralytics' end-of-epoch step, so this epoch is validated and saved (last.pt) before it stops.
    if trainer.epoch + 1 >= epochs:
        trainer.stop = True


def _stop_on_nan(trainer) -> None:
    loss = getattr(trainer, "loss", None)
    if loss is not None and not bool(loss.isfinite().all()):
        raise Diverged(f"training loss became {float(loss.detach().sum())} at epoch {trainer.epoch + 1}")


def _poison_weights(trainer) -> None:
    import torch

    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))


def _inject(job: TrainJob) -> None:
    """Test hook: make this trial fail the way ``job.fault`` says (never set outside tests)."""
    if job.fault == "raise":
        raise RuntimeError(f"injected fault in trial {job.trial}")
    if job.fault == "oom":
        import torch

        raise torch.OutOfMemoryError(f"injected out of memory in trial {job.trial}")
    if job.fault == "die" and job.attempt == 0:
        os._exit(3)  # the worker process dies as if killed; the engine retries once
    if job.fault == "hang":
        time.sleep(10**6)


def _failure(kind: str, message: str, start: float, tb: str | None = None) -> TrainResult:
    return TrainResult(error=message, error_kind=kind, train_s=time.perf_counter() - start,
                       traceback=tb[-4000:] if tb else None)


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _finite(value: Any) -> bool:
    try:
        return value is not None and float(value) == float(value) and abs(float(value)) != float("inf")
    except (TypeError, ValueError):
        return False


class QuietFileHandler(logging.FileHandler):
    """A log file that never prints "--- Logging error ---" with a traceback on the console when a write fails: the
    disk it is on may be the one that is full, which the run reports once, in one line."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the buffered tail could not be flushed: the file is closed anyway
            super().close()


def _trial_log(path: Path) -> logging.Handler:
    """Send Ultralytics' log of this trial to its run directory instead of the driver's console."""
    logger = logging.getLogger("ultralytics")
    handler = QuietFileHandler(path, mode="a")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    for other in logger.handlers:
        if other is not handler and not isinstance(other, logging.FileHandler):
            other.setLevel(logging.WARNING)
    return handler
