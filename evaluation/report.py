"""Accuracies per subject and per group, the results files, and the table printed at the end of a run."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from common.io import write_json, write_text


@dataclass
class SubjectScore:
    """How one subject went."""

    subject: str
    count: int
    """Questions scored."""
    correct: int | None
    """Questions answered correctly; None where the split has no answers."""
    shots: int
    """Few-shot examples asked for that the dev split could supply."""
    shots_dropped: int
    """Questions scored with fewer shots because the full prompt was longer than the context."""
    truncated: int
    """Questions whose zero-shot prompt still did not fit and lost its beginning."""

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else 100.0 * self.correct / self.count


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def group_summary(scores: list[SubjectScore], headline: str) -> dict[str, Any]:
    """Accuracy (percent) of a set of subjects: question-weighted, subject average (macro), and the headline one."""
    count = sum(s.count for s in scores)
    if any(s.correct is None for s in scores):
        weighted = macro = None
    else:
        weighted = 100.0 * sum(s.correct for s in scores) / count
        macro = _mean([s.accuracy for s in scores])
    return {"accuracy": weighted if headline == "weighted" else macro, "weighted_accuracy": weighted,
            "macro_accuracy": macro, "count": count, "num_subjects": len(scores)}


def summarize(scores: list[SubjectScore], groups_of: Callable[[str], dict[str, list[str]]],
              order: dict[str, list[str]], headline: str) -> dict[str, Any]:
    """results.json's accuracy part: subjects, each grouping level (e.g. categories), overall.

    groups_of(subject) names the groups of each level a subject counts towards; order lists each level's
    groups in the order to report them (groups without evaluated subjects are left out).
    """
    members: dict[str, dict[str, list[SubjectScore]]] = {level: {} for level in order}
    for s in scores:
        for level, names in groups_of(s.subject).items():
            for name in names:
                members[level].setdefault(name, []).append(s)
    out: dict[str, Any] = {
        "subjects": {s.subject: {"accuracy": s.accuracy, "count": s.count, "correct": s.correct, "shots": s.shots,
                                 "shots_dropped": s.shots_dropped, "truncated": s.truncated} for s in scores},
    }
    for level, names in order.items():
        out[level] = {name: group_summary(members[level][name], headline) for name in names if name in members[level]}
    out["overall"] = group_summary(scores, headline)
    return out


def format_table(results: dict[str, Any], levels: list[str]) -> str:
    """Subjects, then each level's groups, then overall: name, questions, accuracy in percent."""
    def fmt(value: float | None) -> str:
        return "     -" if value is None else f"{value:6.2f}"

    width = max(len(name) for name in results["subjects"]) + 2
    width = max(width, 34)
    lines = [f"{'subject':<{width}} {'count':>6} {'acc %':>6}"]
    for name, r in results["subjects"].items():
        lines.append(f"{name:<{width}} {r['count']:>6} {fmt(r['accuracy'])}")
    for level in levels:
        if results.get(level):
            lines.append(f"-- {level} --")
            for name, r in results[level].items():
                lines.append(f"{name:<{width}} {r['count']:>6} {fmt(r['accuracy'])}")
    overall = results["overall"]
    lines.append("-- overall --")
    lines.append(f"{'question-weighted':<{width}} {overall['count']:>6} {fmt(overall['weighted_accuracy'])}")
    lines.append(f"{'subject average':<{width}} {overall['count']:>6} {fmt(overall['macro_accuracy'])}")
    return "\n".join(lines)


def write_outputs(out_dir: Path, results: dict[str, Any], predictions: list[dict[str, Any]],
                  extra: dict[str, Any] | None = None) -> None:
    """predictions.jsonl and any extra JSON files (e.g. a submission) first, results.json last, each atomically,
    so a results.json exists only for a finished run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "predictions.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    for name, obj in (extra or {}).items():
        write_json(out_dir / name, obj)
    write_json(out_dir / "results.json", results)
