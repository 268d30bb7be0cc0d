"""What every evaluation task builds and scores: the `Example` (a cached context and the rows scored over
it), the `Task` entry of the registry, and the helpers that lay rows out and score them. Apart from
`tasks` so that a task defined elsewhere (the lm-eval adapter) builds examples without importing the
registry that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

IGNORE = -100


@dataclass
class Example:
    task: str
    index: int
    prefix: torch.Tensor  # [T] long
    feeds: torch.Tensor  # [R, L] long
    targets: torch.Tensor  # [R, L] long, IGNORE where not scored
    label: int | None = None
    meta: dict = field(default_factory=dict)
    split: str = "test"  # the evaluation split it comes from (data.SPLITS)

    @property
    def key(self) -> str:
        """Stable unit key of this example in progress files (the split is named unless it is test)."""
        where = "" if self.split == "test" else f"{self.split}/"
        return f"{self.task}/{where}{self.index:05d}"

    @property
    def example_id(self) -> str:
        """The id that seeds this example's corruption draws (shared by every defense: paired); examples of
        the validation and selection splits draw apart from the test examples."""
        return f"{self.task}:{self.index}" if self.split == "test" else f"{self.task}:{self.split}:{self.index}"

    @property
    def rows(self) -> int:
        return int(self.feeds.shape[0])

    def num_tokens(self) -> int:
        return int(self.prefix.numel() + self.feeds.numel())


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "ppl" | "accuracy"
    value_name: str
    build: Callable[..., tuple[list[Example], dict]]
    score: Callable[[torch.Tensor, Example], float]


def feed_row(prefix_last: int, target: Sequence[int]) -> tuple[list[int], list[int]]:
    """Feed = last context token + target[:-1]; predictions at each feed position are the targets."""
    return [prefix_last] + list(target[:-1]), list(target)


def pad_rows(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(f) for f, _ in rows)
    feeds = torch.full((len(rows), n), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    for i, (f, t) in enumerate(rows):
        feeds[i, :len(f)] = torch.tensor(f)
        targets[i, :len(t)] = torch.tensor(t)
    return feeds, targets


def pad_id(tok) -> int:
    for v in (tok.pad_token_id, tok.eos_token_id, 0):
        if v is not None:
            return int(v)
    return 0


def example_span(task_cfg: Mapping) -> tuple[int, int]:
    """(first example index within the task's split, number of examples)."""
    return int(task_cfg.get("start", 0) or 0), int(task_cfg["num_examples"])


def example_split(task_cfg: Mapping) -> str:
    """The evaluation split a task's examples come from (`data.SPLITS`): test unless the grid says otherwise."""
    return str(task_cfg.get("split") or "test")


def split_stream(name: str, split: str) -> str:
    """The name of a seeded draw for one split: the test split keeps the plain name, the others draw apart."""
    return name if split == "test" else f"{name}:{split}"


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target ([R, L], 0 where ignored) and the scored-position mask."""
    mask = targets != IGNORE
    lp = torch.log_softmax(logits.float(), dim=-1)
    got = lp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, got, torch.zeros_like(got)), mask
