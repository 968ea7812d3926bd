"""What a search needs from a multi-node Ray cluster: the latency node, and the same files on every node.

Every node that may train must see the dataset at the same path with the same content, and the study's ``--out``
(trial directories, the base weights of ``--weights auto``, rung checkpoints are written by one node and read by
another: ``--out`` must be a filesystem every node mounts at the same path). Both are checked before the first
trial by a small task pinned to each node; ``--ship-data`` instead copies a small dataset through Ray's object store
into each node's local cache (:data:`SHIP_LIMIT_MB`).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..errors import SearchError
from ..training.data import list_images

SHIP_LIMIT_MB = 200  # --ship-data copies the dataset into every node's memory and disk; larger sets go on each node
CACHE_ENV = "ATTNAS_DATA_CACHE"  # where shipped datasets go on each node [/tmp/attnas-data]
CHECK_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Node:
    """An alive Ray node, as the search names it."""

    id: str
    hostname: str
    ip: str
    cpus: float
    gpus: float

    def describe(self) -> str:
        return f"{self.hostname} ({self.ip}, node {self.id[:12]})"


def alive_nodes() -> list[Node]:
    """The cluster's alive nodes (needs Ray initialised)."""
    return [Node(n["NodeID"], n.get("NodeManagerHostname", "?"), n.get("NodeManagerAddress", "?"),
                 float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
            for n in ray.nodes() if n.get("Alive")]


def resolve_node(spec: str) -> Node:
    """``--latency-node``: ``driver`` (this process's node), a node id (or a unique prefix of one), or an IP or
    hostname that names exactly one alive node."""
    nodes = alive_nodes()
    if spec == "driver":
        here = ray.get_runtime_context().get_node_id()
        return next(n for n in nodes if n.id == here)
    found = [n for n in nodes if n.id.startswith(spec)] or [n for n in nodes if spec in (n.ip, n.hostname)]
    if len(found) == 1:
        return found[0]
    listed = "; ".join(n.describe() for n in nodes)
    why = "names no alive node" if not found else f"names {len(found)} nodes (give a node id)"
    raise SearchError(f"--latency-node {spec}: {why}; nodes: {listed}")


def is_alive(node_id: str) -> bool:
    return any(n.id == node_id for n in alive_nodes())


def pinned(node_id: str) -> NodeAffinitySchedulingStrategy:
    """Run on this node or not at all (a latency measured elsewhere would not compare)."""
    return NodeAffinitySchedulingStrategy(node_id, soft=False)


# -- the dataset on every node -----------------------------------------------------------------------------------
def dataset_files(data_yaml: Path) -> tuple[Path, dict[str, Path]]:
    """The dataset's root and its files (the YAML, the train/val images and their label files) by path relative
    to the root, as Ultralytics resolves them."""
    from ultralytics.data.utils import check_det_dataset, img2label_paths

    info = check_det_dataset(str(data_yaml), autodownload=False)
    root = Path(info["path"]).resolve()
    files: dict[str, Path] = {}
    for split in ("train", "val"):
        images = list_images(info[split])
        labels = [Path(p) for p in img2label_paths([str(i) for i in images])]
        for f in [*images, *(lb for lb in labels if lb.is_file())]:
            f = f.resolve()
            if not f.is_relative_to(root):
                raise SearchError(f"data YAML {data_yaml}: {f} lies outside the dataset root {root}; --ship-data "
                                  "needs every image and label under the YAML's path")
            files[str(f.relative_to(root))] = f
    return root, files


def manifest(root: str | Path, rels: list[str]) -> dict[str, tuple[int, str]]:
    """Size and sha256 of each file ``root/rel`` by ``rel`` (absent files are left out)."""
    out = {}
    for rel in rels:
        try:
            content = (Path(root) / rel).read_bytes()
        except OSError:
            continue
        out[rel] = (len(content), hashlib.sha256(content).hexdigest())
    return out


@ray.remote(num_cpus=0, max_retries=0)
def _check_node(root: str, rels: list[str], probe: str, token: str) -> dict:
    """On one node: which dataset files it has under ``root`` (size and hash), and whether it sees the driver's
    probe file in --out."""
    try:
        sees_out = Path(probe).read_text() == token
    except OSError:
        sees_out = False
    return {"manifest": manifest(root, rels), "sees_out": sees_out}


@ray.remote(num_cpus=0, max_retries=0)
def _materialise(blob: dict[str, bytes], fingerprint: str, yaml_text: str) -> str:
    """On one node: write a shipped dataset into the node's cache (once per content) and return its YAML there."""
    root = Path(os.environ.get(CACHE_ENV) or "/tmp/attnas-data") / fingerprint
    data_yaml = root / "data.yaml"
    if data_yaml.is_file():
        return str(data_yaml)
    for rel, content in blob.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(content)
        os.replace(tmp, target)  # atomic: another node sharing this disk may write the same file at once
    tmp = data_yaml.with_name(f".data.yaml.{uuid.uuid4().hex[:8]}")
    tmp.write_text(yaml_text.replace("@ROOT@", str(root)))
    os.replace(tmp, data_yaml)  # last: its presence means the copy is complete
    return str(data_yaml)


def training_nodes(gpus_per_trial: float) -> list[Node]:
    """Nodes a training may be placed on: with a CPU, and a GPU when trainings ask for one."""
    return [n for n in alive_nodes() if n.cpus > 0 and (gpus_per_trial == 0 or n.gpus > 0)]


def prepare_nodes(data_yaml: Path, out: Path, gpus_per_trial: float, ship: bool) -> tuple[Path, str]:
    """Check (or, with ``ship``, make) that every training node has the dataset and sees ``--out``.

    Returns the data YAML trainings should read (the shipped copy's path, the same on every node, or
    ``data_yaml``) and a one-line summary. Raises SearchError naming the first node that lacks something."""
    nodes = training_nodes(gpus_per_trial)
    if not nodes:
        raise SearchError("the cluster has no alive node with a CPU" + (" and a GPU" if gpus_per_trial else "")
                          + " to train on")
    root, files = dataset_files(data_yaml)
    rels = sorted(files)
    want = manifest(root, rels)
    node_root, node_yaml = root, data_yaml
    if ship:
        node_yaml = _ship(data_yaml, root, files, nodes)
        node_root = node_yaml.parent
    else:  # the YAML itself must be there too (a shipped copy's YAML is rewritten, so not compared)
        rels.append(os.path.relpath(data_yaml.resolve(), root))
        want.update(manifest(root, rels[-1:]))
    out.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = out / f".node-check-{token[:12]}"
    probe.write_text(token)
    try:
        refs = [_check_node.options(scheduling_strategy=pinned(n.id)).remote(str(node_root), rels, str(probe), token)
                for n in nodes]
        results = ray.get(refs, timeout=CHECK_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise SearchError(f"the dataset check on {len(nodes)} node(s) did not finish in {CHECK_TIMEOUT_S:g} s") from None
    finally:
        probe.unlink(missing_ok=True)
    for node, got in zip(nodes, results):
        missing = [r for r in rels if r not in got["manifest"]]
        differ = [r for r in rels if r in got["manifest"] and got["manifest"][r] != want.get(r)]
        if missing or differ:
            first = Path(node_root) / (missing or differ)[0]
            raise SearchError(f"node {node.describe()} lacks the dataset: {len(missing)} of {len(rels)} files "
                              f"missing, {len(differ)} different (first: {first}); put the same dataset at the same "
                              f"path on every node, or pass --ship-data (datasets up to {SHIP_LIMIT_MB} MB)")
        if not got["sees_out"]:
            raise SearchError(f"node {node.describe()} does not see --out {out} (trial directories, base weights and "
                              "rung checkpoints live there): put --out on a filesystem every node mounts at the "
                              "same path")
    size = sum(s for s, _ in want.values()) / 1e6
    how = "received it through Ray (--ship-data)" if ship else "hold the same dataset"
    return node_yaml, f"{len(nodes)} training node(s) {how} ({len(rels)} files, {size:.1f} MB) and see --out"


def _ship(data_yaml: Path, root: Path, files: dict[str, Path], nodes: list[Node]) -> Path:
    """Copy the dataset into every node's cache through the object store; the copy's YAML (same path on all)."""
    size = sum(f.stat().st_size for f in files.values())
    if size > SHIP_LIMIT_MB * 1e6:
        raise SearchError(f"--ship-data: the dataset is {size / 1e6:.0f} MB, over the {SHIP_LIMIT_MB} MB limit; "
                          "put it at the same path on every node instead")
    blob = {rel: f.read_bytes() for rel, f in files.items()}
    fingerprint = hashlib.sha256(b"".join(rel.encode() + hashlib.sha256(b).digest()
                                          for rel, b in sorted(blob.items()))).hexdigest()[:16]
    from ultralytics.data.utils import check_det_dataset

    info = check_det_dataset(str(data_yaml), autodownload=False)
    raw = yaml.safe_load(data_yaml.read_text())
    raw.update({"path": "@ROOT@", **{split: _relative(info[split], root) for split in ("train", "val")}})
    for key in ("test", "download"):  # not shipped / never run by a search
        raw.pop(key, None)
    ref = ray.put(blob)
    placed = ray.get([_materialise.options(scheduling_strategy=pinned(n.id)).remote(ref, fingerprint,
                                                                                     yaml.safe_dump(raw))
                      for n in nodes], timeout=CHECK_TIMEOUT_S)
    if len(set(placed)) > 1:
        raise SearchError(f"--ship-data: nodes cache the dataset at different paths ({sorted(set(placed))}); set "
                          f"{CACHE_ENV} to the same directory on every node")
    return Path(placed[0])


def _relative(spec, root: Path):
    if isinstance(spec, list):
        return [_relative(s, root) for s in spec]
    return str(Path(spec).resolve().relative_to(root))
