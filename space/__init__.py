"""The search space: candidate YOLO YAMLs made from a base by placing attention layers at graph slots.

>>> from space import load_base, build_space
>>> space = build_space(load_base("yolov8n.yaml"))
>>> [s.name for s in space.slots]
['P3', 'P4', 'P5', 'P5_sppf', 'N3', 'N4', 'N5']

Pure YAML-graph work plus validation: no Ray, no study storage, no training.
"""

from .base import Base, LayerInfo, load_base
from .candidate import (Candidate, Stats, build_model, canonical_hash, count_gflops, make_candidate, to_yaml, validate,
                        validated_model, write_yaml)
from .errors import SpaceError, first_line
from .graph import Placement, Slot, find_slots, mutate
from .inherit import Inheritance, align, check_checkpoint, inherit
from .search_space import NONE, SearchSpace, SpaceConfig, build_space

__all__ = [
    "Base", "Candidate", "Inheritance", "LayerInfo", "NONE", "Placement", "SearchSpace", "Slot", "SpaceConfig", "SpaceError", "Stats",
    "align", "build_model", "build_space", "canonical_hash", "check_checkpoint", "inherit", "count_gflops", "find_slots", "first_line", "load_base", "make_candidate",
    "mutate", "to_yaml", "validate", "validated_model", "write_yaml",
]
