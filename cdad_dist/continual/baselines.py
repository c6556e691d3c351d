"""The two reference points of every continual study: ``naive`` fine-tuning and ``joint`` training."""
from __future__ import annotations

from typing import Any

from cdad_dist.continual.protocol import ContinualStrategy


class NaiveStrategy(ContinualStrategy):
    """Fine-tuning task after task: the forgetting baseline."""

    name = "naive"

    def summary(self) -> dict[str, Any]:
        return {}


class JointStrategy(NaiveStrategy):
    """Every class of the sequence as one task, with the whole sequence's step budget: the upper bound."""

    name = "joint"

    def plan_tasks(self, sequence: list[list[str]]) -> list[list[str]]:
        return [[c for task in sequence for c in task]]

    def task_steps(self, task_index: int, sequence_steps: list[int]) -> int:
        return sum(sequence_steps)

    def summary(self) -> dict[str, Any]:
        return {"tasks_merged": "all classes of the sequence trained as one task"}
