"""Joint channel groups and how each task sees them.

The merged model lays a joint group's channels out in one "union" order: channels used by more tasks
first (the shared ones), then each task's own. Every channel has an owner set. A task sees its own
channels in union order: its "view", a permutation of its original channels. Weights and per-channel
constants are permuted into views when the merged model is written, so no Gather is ever needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .channels import Layout


def owner_key(owners: frozenset, tasks: list[str]) -> tuple:
    """Union order: more owners first, then by task order; so each task's view is block-contiguous."""
    return (-len(owners), sorted(tasks.index(t) for t in owners))


@dataclass
class GroupView:
    """A joint group's union layout: owner set per union channel, and each task's channel -> union index."""

    owners: list[frozenset]
    to_union: dict[str, np.ndarray]

    @property
    def size(self) -> int:
        return len(self.owners)

    @property
    def shared(self) -> int:
        return sum(1 for o in self.owners if len(o) > 1)

    def order(self, task: str) -> np.ndarray:
        """Original channel indices of `task`, in view order."""
        return np.argsort(self.to_union[task], kind="stable")

    def view_to_union(self, task: str) -> np.ndarray:
        """Union index of each view position of `task`."""
        return np.sort(self.to_union[task])

    @classmethod
    def build(cls, channels: list[tuple[frozenset, dict[str, int]]], tasks: list[str]) -> "GroupView":
        """From union channels given as (owners, {task: original index}), in any order."""
        keyed = sorted(enumerate(channels), key=lambda e: (owner_key(e[1][0], tasks), e[0]))
        owners = [c[0] for _, c in keyed]
        to_union = {}
        for task in tasks:
            members = [(u, c[1][task]) for u, (_, c) in enumerate(keyed) if task in c[1]]
            if members:
                arr = np.empty(len(members), dtype=np.int64)
                for u, original in members:
                    arr[original] = u
                to_union[task] = arr
        return cls(owners, to_union)

    @classmethod
    def unshared(cls, widths: dict[str, int], tasks: list[str]) -> "GroupView":
        return cls.build([(frozenset([t]), {t: i}) for t in tasks if t in widths
                          for i in range(widths[t])], tasks)

    @classmethod
    def identical(cls, width: int, owners: list[str], tasks: list[str]) -> "GroupView":
        """All channels used by all `owners` in their original order (a shared graph input)."""
        s = frozenset(owners)
        return cls.build([(s, {t: i for t in owners}) for i in range(width)], tasks)


@dataclass
class AxisMap:
    """One task's view of a layout's axis: where each view position came from and lands in the union."""

    perm: np.ndarray  # view position -> original position
    union: np.ndarray  # view position -> union position
    union_length: int
    owners: list[frozenset]  # owner set of each union position


def axis_map(layout: Layout, task: str, view_of) -> AxisMap:
    """`view_of(group)` gives the GroupView of a task-local group id."""
    perm, union, owners = [], [], []
    offset_o = offset_u = 0
    for seg in layout.segments:
        view = view_of(seg.group)
        order = view.order(task)
        vu = view.view_to_union(task)
        inner = np.arange(seg.inner)
        perm.append((offset_o + order[:, None] * seg.inner + inner).ravel())
        union.append((offset_u + vu[:, None] * seg.inner + inner).ravel())
        owners.extend(o for o in view.owners for _ in range(seg.inner))
        offset_o += seg.size * seg.inner
        offset_u += view.size * seg.inner
    perm, union = np.concatenate(perm), np.concatenate(union)
    if layout.outer > 1:  # the channel pattern repeats (NHWC flattened): same map in every repeat
        reps = np.arange(layout.outer)[:, None]
        perm = (reps * offset_o + perm).ravel()
        union = (reps * offset_u + union).ravel()
        owners = owners * layout.outer
    return AxisMap(perm, union, offset_u * layout.outer, owners)
