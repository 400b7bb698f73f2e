"""Which samples of a micro-batch share a packed row: a pure function of their token counts.

Packing never changes which samples a micro-batch holds (the streaming loader decides that, so
resume, elastic resume and the sample ledger are untouched by it); it only lays those samples out
with less padding. Under SDPA (and eager) the micro-batch becomes rows of at most ``max_length``
tokens, each row padded to the longest one, with a block-diagonal attention mask that transformers
derives from ``position_ids``; under FlashAttention-2 all samples go into one row (transformers'
varlen path only recognises packed samples in a single row), so nothing is padded at all.

Rows are chosen in three passes. First-fit decreasing finds how many rows the samples need (at
most 11/9 of the optimum plus one). Then the same number of rows is refilled longest sample first
into the currently shortest row that still has room (LPT): rows of nearly equal length, so padding
to the longest row costs little; the layout with the shorter longest row wins (ties keep
first-fit's). Last, single moves and swaps out of the longest row shorten it while they can. Every
pass is deterministic (ties by sample index).
"""
from __future__ import annotations

from typing import Sequence


class SampleLongerThanRow(ValueError):
    """A sample longer than a packed row: samples are never split across rows."""


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Sample indices of each row (ascending inside a row; rows ordered by their first sample)."""
    for i, n in enumerate(lengths):
        if n > max_length:
            raise SampleLongerThanRow(f"sample {i} of the micro-batch has {n} tokens, more than a packed row "
                                      f"(data.max_length={max_length}); samples are never split across rows")
        if n < 1:
            raise ValueError(f"sample {i} of the micro-batch has {n} tokens")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    first_fit = _first_fit(order, lengths, max_length)
    balanced = _least_loaded(order, lengths, max_length, len(first_fit))
    best = first_fit
    if balanced is not None and _longest(balanced, lengths) < _longest(first_fit, lengths):
        best = balanced
    best = _shorten_longest(best, lengths, max_length)
    return sorted((sorted(row) for row in best if row), key=lambda row: row[0])


def _first_fit(order: list[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    rows: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        for r, load in enumerate(loads):
            if load + lengths[i] <= capacity:
                rows[r].append(i)
                loads[r] += lengths[i]
                break
        else:
            rows.append([i])
            loads.append(lengths[i])
    return rows


def _least_loaded(order: list[int], lengths: Sequence[int], capacity: int, n_rows: int) -> list[list[int]] | None:
    """LPT into ``n_rows`` rows; None when some sample fits in no row (first-fit's layout stays)."""
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    loads = [0] * n_rows
    for i in order:
        fits = [r for r in range(n_rows) if loads[r] + lengths[i] <= capacity]
        if not fits:
            return None
        r = min(fits, key=lambda k: (loads[k], k))
        rows[r].append(i)
        loads[r] += lengths[i]
    return rows


def _shorten_longest(rows: list[list[int]], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Local search: move one sample out of the longest row, or swap one with a shorter sample of
    another row, while that makes the longest row shorter (the first such change, in a fixed
    order, until none is left: deterministic, and cheap for the few samples of a micro-batch)."""
    rows = [list(r) for r in rows]
    loads = [sum(lengths[i] for i in r) for r in rows]
    improved = True
    while improved:
        improved = False
        top = max(range(len(rows)), key=lambda r: (loads[r], -r))
        for other in range(len(rows)):
            if other == top:
                continue
            for a in sorted(rows[top]):
                for b in [None, *sorted(rows[other])]:
                    delta = lengths[a] - (0 if b is None else lengths[b])
                    if delta <= 0 or loads[other] + delta > capacity or loads[other] + delta >= loads[top]:
                        continue
                    rows[top].remove(a)
                    rows[other].append(a)
                    if b is not None:
                        rows[other].remove(b)
                        rows[top].append(b)
                    loads[top], loads[other] = loads[top] - delta, loads[other] + delta
                    improved = True
                    break
                if improved:
                    break
            if improved:
                break
    return rows


def _longest(rows: list[list[int]], lengths: Sequence[int]) -> int:
    return max(sum(lengths[i] for i in row) for row in rows)


def padding_fraction(lengths: Sequence[int], rows: list[list[int]]) -> float:
    """Share of the [rows x longest row] tensor that is padding."""
    width = _longest(rows, lengths)
    return 1.0 - sum(lengths) / (width * len(rows))
