"""The disk space a search may need at its peak, estimated before anything is written, and the warning printed when
the device of ``--out`` has less free.

The estimate comes from the base's parameter count (building the base costs a fraction of a second; nothing is
trained). What dominates it is the rung checkpoints: with several rungs every candidate keeps its Ultralytics
``last.pt`` while it waits for a promotion (``search/engine/rungs.py`` removes it when the candidate stops), so in
the worst case every candidate of the budget holds one at once.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from space import Base, build_model, make_candidate

from .settings import RunSettings, StudySettings

# Bytes per parameter of an Ultralytics training checkpoint (last.pt, best.pt): the EMA network in fp16 (2 bytes)
# and the optimizer state, which Ultralytics keeps in fp32 for Adam's moments exp_avg and exp_avg_sq (8 bytes) and
# turns to fp16 for SGD's momentum (2 bytes); the live model is not saved ("model": None).
# Measured (Ultralytics 8.4.190, yolov8n, 80 classes, 3,157,200 parameters, imgsz 64): AdamW last.pt 31,908,391
# bytes (EMA 6.5 MB, optimizer 25.4 MB, the rest ~6 kB) = 10.1 bytes/param; SGD last.pt 12,866,307 = 4.08.
ADAM_CHECKPOINT_BYTES_PER_PARAM = 10  # taken for every optimizer but SGD (none keeps more than Adam's two moments)
SGD_CHECKPOINT_BYTES_PER_PARAM = 4
# Per checkpoint beyond the parameters: the pickled module tree, per-tensor headers, BatchNorm buffers, train
# arguments and results; measured 0.24 MB (SGD) to 0.34 MB (AdamW) for yolov8n.
CHECKPOINT_OVERHEAD_BYTES = 512 * 1024
# base-weights.pt is a float32 state dict: measured 12,758,247 bytes for yolov8n = 4.04 bytes/param.
STATE_BYTES_PER_PARAM = 4
STATE_OVERHEAD_BYTES = 256 * 1024
# Candidates are larger than the base: attention layers added on average 35% parameters over 80 random yolov8n
# candidates of the default space (median 22%, one in ten over 90%, the largest 2.9x; yolov8s alike); the rung
# checkpoints are the sum over many candidates, so the mean with a margin is used.
CANDIDATE_PARAMS_MARGIN = 1.5
# Everything else: study.db, the exported front and its plots, the artifacts; per trial its train.log, args,
# results, candidate YAML and latency windows (~10 kB measured, in 4 kB blocks) and its rows in study.db.
OTHER_FILES_BYTES = 20 * 10**6
OTHER_BYTES_PER_TRIAL = 100 * 1000


@dataclass(frozen=True)
class PeakNeed:
    """What a run may hold on disk at once at its peak, by part (bytes)."""

    checkpoints: int  # how many training checkpoints may exist at once
    checkpoint_bytes: int  # each, for a candidate of the estimated size
    checkpoint_kind: str  # "rung checkpoints" or "kept checkpoints (--save-weights)"
    base_bytes: int  # the base's weights and, for --weights auto, its training's checkpoints
    other_bytes: int  # logs, YAMLs, the study database, the exported front

    @property
    def total(self) -> int:
        """All parts together."""
        return self.checkpoints * self.checkpoint_bytes + self.base_bytes + self.other_bytes

    def parts(self) -> str:
        """The parts in words, checkpoints first, e.g. ``51 rung checkpoints of ~48 MB each, 64 MB of base weights``."""
        words = [f"{self.checkpoints} {self.checkpoint_kind} of ~{human(self.checkpoint_bytes)} each"] \
            if self.checkpoints else []
        if self.base_bytes:
            words.append(f"{human(self.base_bytes)} of base weights")
        return ", ".join(words + [f"{human(self.other_bytes)} of logs and study files"])


def checkpoint_bytes(n_params: int, optimizer: str = "auto") -> int:
    """Size of an Ultralytics training checkpoint of a network of ``n_params`` parameters trained with
    ``optimizer``."""
    # "auto" picks AdamW for short trainings (MuSGD beyond 10,000 iterations): the larger factor is the safe one.
    per_param = SGD_CHECKPOINT_BYTES_PER_PARAM if str(optimizer).lower() == "sgd" else ADAM_CHECKPOINT_BYTES_PER_PARAM
    return n_params * per_param + CHECKPOINT_OVERHEAD_BYTES


def state_bytes(n_params: int) -> int:
    """Size of a float32 state dict (``base-weights.pt``) of ``n_params`` parameters."""
    return n_params * STATE_BYTES_PER_PARAM + STATE_OVERHEAD_BYTES


def checkpoints_at_peak(n_rungs: int, save_weights: bool, remaining: int, workers: int) -> int:
    """How many candidate checkpoints may exist at once, for ``remaining`` candidates still to train."""
    if save_weights:
        return 2 * remaining  # every trial keeps its last.pt and best.pt (search/training/proxy.py keep_best)
    if n_rungs > 1:
        # Every candidate may wait at the first rung with its last.pt (a promotion overwrites it: all rungs of a
        # trial write to its one directory), and one more per training in flight, as failed trials do not count
        # toward the budget yet may leave theirs.
        return remaining + min(workers, remaining)
    return 0  # a single rung writes no weights


def base_bytes(weights_mode: str, n_params: int, base_optimizer: str, stored: bool) -> int:
    """What the base's weights add: none for ``--weights none`` or when the study already stored them."""
    if weights_mode == "none" or stored:
        return 0
    if weights_mode == "path":
        return state_bytes(n_params)  # the checked state dict copied into the study
    # auto: the base training keeps last.pt and best.pt; its state dict goes to the study and to the cache.
    return 2 * checkpoint_bytes(n_params, base_optimizer) + 2 * state_bytes(n_params)


def peak_need(s: StudySettings, run: RunSettings, n_params: int, counted: int = 0,
              base_stored: bool = False) -> PeakNeed:
    """The most this run may hold on disk at once: the base has ``n_params`` parameters, ``counted`` candidates of
    the budget are already evaluated (an existing study's), ``base_stored`` when the study already holds its base."""
    remaining = max(0, run.budget - counted)
    candidate_params = round(n_params * CANDIDATE_PARAMS_MARGIN)
    kind = "kept checkpoints (--save-weights)" if run.save_weights else "rung checkpoints"
    return PeakNeed(
        checkpoints=checkpoints_at_peak(len(s.fidelity.rungs), run.save_weights, remaining, run.workers),
        checkpoint_bytes=checkpoint_bytes(candidate_params, _optimizer(s.proxy.train_args)),
        checkpoint_kind=kind,
        base_bytes=base_bytes(s.weights.mode, n_params, _optimizer(s.weights.train_args), base_stored),
        other_bytes=OTHER_FILES_BYTES + OTHER_BYTES_PER_TRIAL * remaining)


def base_params(base: Base, nc: int) -> int:
    """Parameters of the base network built for ``nc`` classes (the class branch of the head depends on it)."""
    model = build_model(make_candidate(replace(base, yaml={**base.yaml, "nc": nc}))).model
    return sum(p.numel() for p in model.parameters())


def free_bytes(out: Path) -> int:
    """Free bytes on the device ``out`` is (or will be) on: that of its nearest existing ancestor."""
    probe = Path(out)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def short_of_space(out: Path, need: PeakNeed, free: int) -> str | None:
    """The warning line when ``free`` bytes are less than the run may need, else None."""
    if free >= need.total:
        return None
    return (f"warning: {human(free)} free on the device of {out}; this run may need up to {human(need.total)} at "
            f"its peak ({need.parts()}); free space or pass --out on another disk")


def warn_if_short_of_space(out: Path, need: PeakNeed) -> None:
    """Print :func:`short_of_space`'s line on stderr, if any; the run goes on (a disk can be freed meanwhile)."""
    line = short_of_space(out, need, free_bytes(out))
    if line:
        print(line, file=sys.stderr)


def human(n_bytes: float) -> str:
    """Bytes in decimal units as ``df -H`` gives them: ``0.8 GB``, ``24 MB``, ``4.2 MB``."""
    unit, size = next(((u, s) for u, s in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)) if n_bytes >= s), ("kB", 1e3))
    value = n_bytes / size
    return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"


def _optimizer(train_args: tuple[tuple[str, object], ...]) -> str:
    """The Ultralytics optimizer a training uses (``auto`` unless a train argument names one)."""
    return str(dict(train_args).get("optimizer", "auto"))
