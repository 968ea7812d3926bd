"""Everything ``python -m search.run`` checks before anything is written: the flags resolved into typed settings,
the output directory and study name, the base, the space, the dataset, the devices, and an existing study's
recorded settings (a resume takes them; a different run is refused by name).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from space import Base, SearchSpace, SpaceError, build_space, canonical_hash, load_base

from . import disk
from . import objectives as obj
from .errors import SearchError
from .settings import (RAY_CONNECT_S, RunSettings, Settings, StudySettings, default, differences, run_settings,
                       study_settings)
from .storage import study as st
from .storage.study import recorded_study_dir
from .training.data import DataInfo, builtin_name, check_data, safe_batch
from .training.weights import STATE_FILE, check_user_checkpoint

if TYPE_CHECKING:
    import optuna

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # one path component, no '..', no hidden directory


@dataclass(frozen=True)
class Prepared:
    """The checked settings and what they resolve to, ready to open a study with."""

    settings: Settings
    space: SearchSpace
    data: DataInfo
    objectives: tuple[obj.Objective, ...]
    checkpoint: tuple[dict, tuple[str, ...]] | None = None  # --weights PATH, loaded and checked


def prepare(args: argparse.Namespace) -> Prepared:
    """Check everything the run needs, reading (never writing) an existing study's settings."""
    run = run_settings(args)
    _check_devices(run)
    out = Path(args.out).expanduser().resolve()
    check_out(out)
    study_name = args.study_name or _default_name(args)
    if args.resume and not args.study_name:
        study_name = _study_to_resume(args, out, study_name)
    if args.storage is None:
        check_study_name(study_name)  # the default storage is <out>/<name>/study.db
    storage_url = args.storage or st.default_storage(out, study_name)
    existing = _existing(storage_url, study_name, required=args.resume)
    if existing is None or not recorded_study_dir(existing):
        # A new study's files go to <out>/<name>/; a study renamed in optuna-dashboard keeps its recorded directory.
        check_study_name(study_name)
    stored = StudySettings.from_dict(_recorded(existing, storage_url)) if existing is not None else None
    s = study_settings(args, stored if args.resume else None)
    # What cannot be timed here (TensorRT, fp16 or CUDA without a GPU) is refused before anything is written; a
    # cluster's GPUs are checked once Ray is up, still before any study exists.
    s.latency.check(gpu_available=True if run.ray_address else None)
    if run.ray_address:
        check_ray_address(run.ray_address)
    base = load_base(s.base)
    space = build_space(base, s.space)
    _check_space_at_proxy_size(base, s)
    data = check_data(s.data, out / ".data", list(s.proxy.fraction) if isinstance(s.proxy.fraction, tuple)
                      else s.proxy.fraction)
    s = replace(s, proxy=replace(s.proxy, batch=safe_batch(data.train_used, s.proxy.batch)),
                facts={"base": {"scale": base.scale, "hash": canonical_hash(base.yaml)},
                       "data": {"identity": data.identity, "fingerprint": data.fingerprint, "nc": data.nc,
                                "train_images": data.n_train, "val_images": data.n_val},
                       # Latencies from another runtime version, processor or machine do not compare. Here: this
                       # machine's; the latency node's once Ray is up (search.session.check_latency_node).
                       "latency": _latency_facts(s, run, stored)})
    # A mismatched checkpoint is refused before anything is written; the checked state is kept for the run.
    checkpoint = check_user_checkpoint(s.weights, base, data.nc) if s.weights.mode == "path" else None
    if existing is not None:
        # Read back through StudySettings first: settings added since the study was made read as what it used.
        recorded = StudySettings.from_dict(existing.user_attrs[st.SETTINGS_ATTR]).as_dict()
        diffs = differences(recorded, s.as_dict())
        if diffs:
            hint = "" if args.resume else "; pass --resume to take the study's settings, or a new --study-name"
            raise SearchError(f"study {study_name!r} was run with other settings: " + "; ".join(diffs) + hint)
    settings = Settings(s, run, study_name, storage_url, out, args.resume)
    _warn_of_free_space(settings, base, data.nc, existing)
    return Prepared(settings, space, data, s.objective_table(), checkpoint)


def check_study_name(name: str) -> None:
    """A study name is a directory under ``--out``: one safe path component, so nothing is written outside it."""
    if not SAFE_NAME.fullmatch(name) or name.strip(".") == "":
        raise SearchError(f"study name {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a letter "
                          "or digit (it is a directory under --out)")


def check_out(out: Path) -> None:
    """``--out`` must be a directory that exists or can be made, and be writable; checked without creating it."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise SearchError(f"--out {out}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SearchError(f"--out {out}: {probe} is not writable")


def check_ray_address(address: str) -> None:
    """Refuse a cluster address whose port does not answer, within RAY_CONNECT_S (Ray itself retries for minutes).

    ``auto`` is resolved by Ray from RAY_ADDRESS or the local session file; when neither names a cluster, ray.init
    fails at once, so only explicit host:port addresses need this check."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
        if not address or address == "auto":
            return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise SearchError(f"--ray-address {address}: expected auto, host:port or ray://host:port")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_S):
            pass
    except OSError as err:
        reason = "no answer" if isinstance(err, TimeoutError) else (err.strerror or type(err).__name__)
        raise SearchError(f"--ray-address {address}: cannot reach a Ray cluster there ({reason} within "
                          f"{RAY_CONNECT_S:g} s); start one with `ray start --head` or drop --ray-address") from None


def _check_space_at_proxy_size(base, s: StudySettings) -> None:
    """Values that fit the deployment size (the space's ``imgsz``) may fit no feature map at the proxy's --imgsz,
    where every candidate is built and trained: such a space has no candidate to train."""
    if s.proxy.imgsz >= s.space.imgsz:
        return
    try:
        build_space(base, replace(s.space, imgsz=s.proxy.imgsz))
    except SpaceError as err:
        raise SearchError(f"the space is empty at --imgsz {s.proxy.imgsz} (candidates train at that size): "
                          f"{str(err).removeprefix('space: ')}") from None


def _warn_of_free_space(settings: Settings, base: Base, nc: int, existing: optuna.Study | None) -> None:
    """Warn (never refuse: a disk can be freed while the run goes on) when the device of ``--out`` has less free
    space than the run may hold at its peak; an existing study's evaluated candidates and stored base need none."""
    study_dir = (recorded_study_dir(existing) if existing is not None else None) or settings.study_dir
    need = disk.peak_need(settings.study, settings.run, disk.base_params(base, nc),
                          counted=len(st.counted_trials(existing)) if existing is not None else 0,
                          base_stored=(study_dir / STATE_FILE).is_file())
    disk.warn_if_short_of_space(settings.out, need)


_LATENCY_FACTS = ("backend_version", "device_model", "node")


def _latency_facts(s: StudySettings, run: RunSettings, stored: StudySettings | None) -> dict[str, Any]:
    """The latency facts of this machine, or (latency timed on another node) the stored ones until Ray is up."""
    recorded = stored.facts.get("latency") if stored is not None else None
    if run.latency_node != "driver" and recorded is not None:
        return dict(recorded)
    here = {**{k: v for k, v in s.latency.identity().items() if k in _LATENCY_FACTS}, "node": socket.gethostname()}
    if recorded is not None and "node" not in recorded:  # a study from before latency nodes were recorded
        here.pop("node")
    return here


def _check_devices(run: RunSettings) -> None:
    if run.gpus_per_trial > 0 and not run.ray_address:
        if torch.cuda.device_count() == 0:
            raise SearchError(f"--gpus-per-trial {run.gpus_per_trial:g} but this machine has no GPU; "
                              "leave it at 0 for CPU trials")
    if run.sampler == "gp":
        if importlib.util.find_spec("scipy") is None:  # Optuna's GPSampler fits its kernel with scipy
            raise SearchError("--sampler gp needs scipy, which is not installed (pip install scipy)")


def _study_to_resume(args: argparse.Namespace, out: Path, fallback: str) -> str:
    """``--resume`` without ``--study-name``: the default-named study if it exists, else the only one there is."""
    if args.storage:
        names = st.study_names(args.storage) if st.may_hold_studies(args.storage) else []
        where = args.storage
    else:
        names = [p.parent.name for p in sorted(out.glob("*/study.db"))]
        where = f"{out}/*/study.db"
    if fallback in names:
        return fallback
    if len(names) == 1:
        return names[0]
    listed = ", ".join(names) if names else "none"
    raise SearchError(f"--resume: which study? pass --study-name (studies in {where}: {listed})")


def _existing(storage_url: str, study_name: str, required: bool):
    if st.may_hold_studies(storage_url):
        found = st.find_study(st.open_storage(storage_url), study_name)
    else:
        st.check_new_storage(storage_url)
        found = None
    if required and found is None:
        raise SearchError(f"--resume: no study {study_name!r} in {storage_url}; run without --resume to start it")
    return found


def _recorded(study, storage_url: str) -> dict[str, Any]:
    stored = study.user_attrs.get(st.SETTINGS_ATTR)
    if not stored:
        raise SearchError(f"study {study.study_name!r} in {storage_url} was not made by attnas (no recorded settings)")
    return stored


def _default_name(args: argparse.Namespace) -> str:
    data = builtin_name(args.data) or Path(args.data).stem
    return f"{Path(str(args.base or default('base'))).stem}-{data}"
