"""Confirmation of the front, and the study's report on its own fidelity.

After the budget, every member of the top-rung front and the base are trained again at the top rung with
``--confirm-seeds`` more seeds. Each result is kept in the study's ``attnas_confirmation`` attribute as it arrives
(a finished trial takes no more attributes; a resumed run trains only what is missing). The exported front is then
recomputed on the seed means, with mean, sd and n per objective, and a candidate whose mAP is not above the base's
by more than two standard errors is marked. Objectives measured before training (latency, size) do not depend on
the seed: their n is 1 and their sd 0.

One seed gives the base and every candidate the same images in the same order (common random numbers), so the
comparison with the base is paired: the candidate's difference to the base at each seed both trained, and the
standard error of those differences (smaller than the two seeds' spreads combined when a seed moves both alike),
their sd pooled over the confirmed candidates (one candidate's own, from two seeds, is too unsure: ``pooled``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from .. import objectives as obj
from ..storage import study as st
from . import pareto
from .fidelity import rung_taus
from .ranks import pareto_ranks



def targets(study: optuna.Study, objectives: Sequence[obj.Objective],
            front: Sequence[FrozenTrial] | None = None) -> list[FrozenTrial]:
    """What confirmation retrains: the top-rung front (``front`` when the caller holds it) and the base."""
    chosen = list(front) if front is not None else pareto.pareto_trials(study, objectives)
    base = pareto.base_trial(study)
    if base is not None and base.number not in {t.number for t in chosen}:
        chosen.append(base)
    return chosen


def recorded(study: optuna.Study) -> dict[str, dict[str, list]]:
    return dict(study.user_attrs.get(st.CONFIRM_ATTR) or {})


def todo(study: optuna.Study, objectives: Sequence[obj.Objective], seeds: int) -> list[tuple[FrozenTrial, int]]:
    """(trial, k) pairs still to train: seed offsets 1..``seeds`` not recorded yet (failed ones are not retried)."""
    done = recorded(study)
    return [(t, k) for t in targets(study, objectives) for k in range(1, seeds + 1)
            if k not in done.get(str(t.number), {}).get("offsets", [])]


def record(study: optuna.Study, number: int, offset: int, values: list[float] | None, error: str | None = None,
           train_s: float | None = None) -> None:
    """Store the result of one confirmation training (its values or its error, and its training seconds)."""
    entry = recorded(study).get(str(number), {"offsets": [], "values": [], "errors": []})
    entry["offsets"] = [*entry["offsets"], offset]
    if train_s is not None:
        entry["train_s"] = [*entry.get("train_s", []), round(train_s, 2)]
    if values is not None:
        entry["values"] = [*entry["values"], values]
        entry["value_offsets"] = [*entry.get("value_offsets", []), offset]
    if error:
        entry["errors"] = [*entry.get("errors", []), error]
    study.set_user_attr(st.CONFIRM_ATTR, {**recorded(study), str(number): entry})


@dataclass(frozen=True)
class Confirmed:
    """One confirmed trial: per objective the mean, sd and n over its seeds, and whether it beats the base."""

    trial: FrozenTrial
    mean: tuple[float, ...]
    sd: tuple[float, ...]
    n: tuple[int, ...]
    # mAP above the base's by more than 2 standard errors of the paired difference, its sd pooled over the
    # confirmed candidates (None: no base / is the base)
    above_base: bool | None
    vs_base: tuple[float, float, int] | None = None  # paired mAP difference to the base: mean, sd, seeds

    def row(self, objectives: Sequence[obj.Objective]) -> dict[str, Any]:
        out: dict[str, Any] = {"trial": self.trial.number}
        for o, m, s, n in zip(objectives, self.mean, self.sd, self.n):
            out.update({f"{o.name}_mean": m, f"{o.name}_sd": s, f"{o.name}_n": n})
        out["above_base_2se"] = self.above_base
        if self.vs_base is not None:
            out.update(zip(("vs_base_mean", "vs_base_sd", "vs_base_n"), self.vs_base))
        return out


def confirmed(study: optuna.Study, objectives: Sequence[obj.Objective]) -> list[Confirmed]:
    """Every confirmed trial with its seed statistics (the trial's own run counts as one seed)."""
    records = recorded(study)
    # front_trials: a trial whose latency is not trusted yet is left out, a re-measured one has its new latency
    trials = {t.number: t for t in pareto.front_trials(study, objectives)}
    main = next(i for i, o in enumerate(objectives) if o.needs_training)
    stats, by_seed = {}, {}
    for key, entry in records.items():
        t = trials.get(int(key))
        if t is None:
            continue
        runs = [list(t.values), *entry.get("values", [])]
        by_seed[t.number] = _main_by_offset(t, entry, main)
        mean, sd, n = [], [], []
        for i, o in enumerate(objectives):
            column = [r[i] for r in runs] if o.needs_training else [t.values[i]]
            mean.append(statistics.fmean(column))
            sd.append(statistics.stdev(column) if len(column) > 1 else 0.0)
            n.append(len(column))
        stats[t.number] = (tuple(mean), tuple(sd), tuple(n))
    base = pareto.base_trial(study)
    compared = base is not None and base.number in stats
    pairs = {number: paired_difference(by_seed[number], by_seed[base.number])
             for number in stats if compared and number != base.number}
    pooled_sd = pooled([p for p in pairs.values() if p is not None])
    out = []
    for number, (mean, sd, n) in stats.items():
        above = paired = None
        if compared and number != base.number:
            paired = pairs[number]
            if paired is not None:
                diff, se = paired[0], pooled_sd / math.sqrt(paired[2])
            else:  # fewer than two seeds both trained (a failed one): the two samples' spreads
                bm, bs, bn = (v[main] for v in stats[base.number])
                diff, se = mean[main] - bm, math.sqrt(sd[main] ** 2 / n[main] + bs ** 2 / bn)
            above = bool(diff > 2 * se) if (se > 0 or diff != 0) else False
        out.append(Confirmed(trials[number], mean, sd, n, above, paired))
    return out


def _main_by_offset(t: FrozenTrial, entry: dict, main: int) -> dict[int, float]:
    """The main objective of each seed offset a trial has (0: its own top-rung run). Records from before offsets
    were kept with the values pair them only when no seed failed."""
    offsets = entry.get("value_offsets")
    if offsets is None:
        offsets = entry["offsets"] if len(entry["offsets"]) == len(entry.get("values", [])) else []
    return {0: t.values[main], **{k: v[main] for k, v in zip(offsets, entry.get("values", []))}}


def pooled(paired: Sequence[tuple[float, float, int]]) -> float:
    """The sd of the paired differences to the base pooled over the candidates, ``(mean, sd, seeds)`` each:
    sqrt(sum (n - 1) sd^2 / sum (n - 1)). With two seeds a candidate's own sd has one degree of freedom, and it is
    below an eighth of the true one one time in ten: a default run flagged +0.0007 "above the base" on its own sd
    0.0003 while the seed sd was 0.003."""
    weight = sum(n - 1 for _, _, n in paired)
    return math.sqrt(sum((n - 1) * sd * sd for _, sd, n in paired) / weight) if weight else 0.0


def paired_difference(candidate: dict[int, float], base: dict[int, float]) -> tuple[float, float, int] | None:
    """Mean, sd and count of ``candidate - base`` over the seed offsets both have; None for fewer than two."""
    shared = sorted(set(candidate) & set(base))
    if len(shared) < 2:
        return None
    diffs = [candidate[k] - base[k] for k in shared]
    return statistics.fmean(diffs), statistics.stdev(diffs), len(diffs)


def confirmed_front(objectives: Sequence[obj.Objective], rows: list[Confirmed]) -> list[Confirmed]:
    """The non-dominated confirmed trials on their seed means, listed as fronts are (fastest first by default)."""
    if not rows:
        return []
    sign = np.array([-1.0 if o.maximize else 1.0 for o in objectives])
    ranks = pareto_ranks(np.array([r.mean for r in rows]) * sign)
    front = [r for r, rank in zip(rows, ranks) if rank == 0]
    key = obj.sort_key(objectives)
    return sorted(front, key=lambda r: key(_Values(r.mean)))


@dataclass(frozen=True)
class _Values:
    values: tuple[float, ...]


def fidelity_report(study: optuna.Study, objectives: Sequence[obj.Objective],
                    rungs: Sequence[int]) -> dict[str, Any]:
    """Kendall tau of the main (first training) objective between consecutive rungs, over the candidates that
    reached both; the seed sd of that objective pooled over the confirmed trials; epochs spent vs. every candidate
    at the top rung."""
    main = next(i for i, o in enumerate(objectives) if o.needs_training)
    per_candidate = {t.number: {e: v[main] for e, v in st.rung_results(t).items()}
                     for t in study.get_trials(deepcopy=False) if st.rung_results(t)}
    rows = confirmed(study, objectives)
    sds = [c.sd[main] for c in rows if c.n[main] > 1]
    paired = [c.vs_base for c in rows if c.vs_base is not None]
    candidates = len(per_candidate) if len(rungs) > 1 else len(st.counted_trials(study))
    spent = (sum(max(r) for r in per_candidate.values()) if len(rungs) > 1
             else candidates * rungs[-1])
    seeds = sum(len(e.get("offsets", [])) for e in recorded(study).values())
    return {
        "objective": objectives[main].name,
        "rung_kendall_tau": rung_taus(rungs, per_candidate) if len(rungs) > 1 else [],
        "seed_sd": math.sqrt(statistics.fmean(s * s for s in sds)) if sds else None,
        "seed_sd_from": len(sds),
        # sd of a candidate's paired difference to the base over seeds: the noise the comparison with the base sees
        "paired_sd": pooled(paired) if paired else None,
        "paired_sd_from": len(paired),
        "epochs": {"candidates": candidates, "spent_on_candidates": spent, "confirmation": seeds * rungs[-1],
                   "all_at_top_rung": candidates * rungs[-1]},
    }


def describe(report: dict[str, Any]) -> list[str]:
    """The fidelity report as lines for the console."""
    lines = []
    for row in report["rung_kendall_tau"]:
        tau = row["kendall_tau"]
        shown = (f"{tau:+.3f} over {row['candidates']} candidates" if not math.isnan(tau)
                 else f"not defined over {row['candidates']} candidate(s)")
        lines.append(f"Kendall tau of {report['objective']} between rungs {row['from_epochs']} and "
                     f"{row['to_epochs']} epochs: {shown}")
    if report["seed_sd"] is not None:
        lines.append(f"seed sd of {report['objective']}: {report['seed_sd']:.4f} (pooled over "
                     f"{report['seed_sd_from']} confirmed trials)")
    if report.get("paired_sd") is not None:
        lines.append(f"sd of the paired difference to the base: {report['paired_sd']:.4f} (pooled over "
                     f"{report['paired_sd_from']} confirmed candidates; same seed, same batches)")
    e = report["epochs"]
    lines.append(f"epochs: {e['spent_on_candidates']} on {e['candidates']} candidates + {e['confirmation']} confirming, "
                 f"vs {e['all_at_top_rung']} to train every candidate to the top rung")
    return lines
