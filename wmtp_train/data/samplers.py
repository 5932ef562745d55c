"""Deterministic, rank-sharded, checkpointable samplers for the two training stages.

Both samplers define one *global stream* of dataset indices from ``seed`` (and ``epoch``), identical on
every rank. Global position ``p`` goes to rank ``p % world_size`` (``DistributedSampler`` style), so with a
per-rank batch ``B`` each global batch of ``B * world_size`` consecutive positions is split into disjoint
per-rank slices. The stream is drawn in blocks of :data:`BLOCK` positions (with length grouping, a
multiple of the grouping window near it), each from its own generator
``numpy.random.default_rng([seed, epoch, block])``, so any position is reachable without replaying the
stream. Indices are drawn with replacement: positions never overlap across ranks, though the same record
may be drawn twice.

Resume: ``state_dict()`` holds the global position of the next sample (``start + yielded * world_size``,
assuming all ranks consume in lockstep), so it also resumes under a different ``world_size``. With a
prefetching DataLoader the sampler runs ahead of training; a trainer that knows how many samples it
really consumed can set the position with ``load_state_dict({"position": ...})``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from wmtp_train.data.records import MAX_DIFFICULTY, MIN_DIFFICULTY

log = logging.getLogger(__name__)

BLOCK = 4096

#: Curriculum buckets: difficulty ranges (inclusive).
CURRICULUM_BUCKETS = {"low": (1, 3), "medium": (4, 7), "high": (8, 11)}
#: (fraction of total steps where the phase ends, bucket proportions low/medium/high).
CURRICULUM_SCHEDULE = ((0.3, (0.7, 0.3, 0.0)), (0.7, (0.3, 0.6, 0.1)), (1.0, (0.1, 0.5, 0.4)))


def _as_metadata(name: str, values, n: int | None = None) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {array.shape}")
    if n is not None and len(array) != n:
        raise ValueError(f"{name} has {len(array)} entries, expected {n}")
    return array


class _StreamSampler(torch.utils.data.Sampler):
    """The shared machinery: block-seeded global stream, rank sharding and position state."""

    def __init__(self, num_samples: int | None, seed: int, rank: int, world_size: int):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if num_samples is not None and num_samples < world_size:
            raise ValueError(f"num_samples ({num_samples}) must be >= world_size ({world_size})")
        self.num_samples = num_samples
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0
        self.block_size = BLOCK

    def _draw_block(self, rng: np.random.Generator, start: int, count: int) -> np.ndarray:
        """Dataset indices for global positions ``start .. start + count - 1``."""
        raise NotImplementedError

    def _stop(self) -> int | None:
        """The global position where the stream ends (a multiple of world_size), or None."""
        if self.num_samples is None:
            return None
        return self.num_samples - self.num_samples % self.world_size

    def __len__(self) -> int:
        stop = self._stop()
        if stop is None:
            raise TypeError(f"{type(self).__name__} without num_samples is infinite")
        return stop // self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Start an epoch: a different stream, from position 0 (a finished pass does this itself).

        Args:
            epoch: the epoch number.
        """
        self.epoch = int(epoch)
        self.position = 0

    def __iter__(self) -> Iterator[int]:
        stop = self._stop()
        pos = self.position + (self.rank - self.position) % self.world_size
        block_id, block = -1, None
        while stop is None or pos < stop:
            if pos // self.block_size != block_id:
                block_id = pos // self.block_size
                rng = np.random.default_rng([self.seed, self.epoch, block_id])
                block = self._draw_block(rng, block_id * self.block_size, self.block_size)
            index = int(block[pos - block_id * self.block_size])
            pos += self.world_size
            # The state advances by a whole global step per local sample (all ranks in lockstep).
            self.position = pos - self.rank
            yield index
        # A finished pass rolls over to the next epoch, so iterating again gives a fresh stream.
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict:
        """The sampler's resumable state."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from :meth:`state_dict`.

        Args:
            state: ``{"seed", "epoch", "position"}``; the seed must match this sampler's.
        """
        if int(state["seed"]) != self.seed:
            raise ValueError(f"state seed {state['seed']} does not match the sampler seed {self.seed}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


class BalancedSampler(_StreamSampler):
    """Stage 1: 50/50 on ``is_correct``, spread across difficulties.

    Each draw: a fair coin picks the label; a difficulty is picked uniformly among those that have
    records with that label; a record is picked uniformly among the records with that label and
    difficulty (with replacement). If one label has no record at all, every draw uses the other label
    (logged once).
    """

    def __init__(
        self,
        is_correct,
        difficulty,
        num_samples: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        """Group the records by (label, difficulty).

        Args:
            is_correct: per-record labels (e.g. ``dataset.index.is_correct``).
            difficulty: per-record difficulties 1..11.
            num_samples: global stream length (None = infinite); each rank gets
                ``num_samples // world_size``.
            seed: stream seed.
            rank: this process's rank.
            world_size: number of ranks.
        """
        super().__init__(num_samples, seed, rank, world_size)
        labels = _as_metadata("is_correct", is_correct).astype(bool)
        levels = _as_metadata("difficulty", difficulty, len(labels)).astype(np.int64)
        self._groups: list[list[np.ndarray]] = []
        for label in (False, True):
            groups = [
                np.flatnonzero((labels == label) & (levels == d))
                for d in range(MIN_DIFFICULTY, MAX_DIFFICULTY + 1)
            ]
            self._groups.append([g for g in groups if len(g)])
        if not all(self._groups):
            missing = "correct" if not self._groups[1] else "incorrect"
            log.warning("BalancedSampler: no %s record; every draw uses the other label", missing)

    def _draw_block(self, rng: np.random.Generator, start: int, count: int) -> np.ndarray:
        coins = rng.integers(0, 2, size=count)
        level_u = rng.random(count)
        item_u = rng.random(count)
        out = np.empty(count, dtype=np.int64)
        for j in range(count):
            groups = self._groups[coins[j]] or self._groups[1 - coins[j]]
            group = groups[int(level_u[j] * len(groups))]
            out[j] = group[int(item_u[j] * len(group))]
        return out


class UniformSampler(_StreamSampler):
    """Stage 1 on the records' own label mix: every draw picks a record uniformly (with replacement).

    A critic trained on this stream estimates P(success | prefix) under the data's base rate, where
    :class:`BalancedSampler` shifts it to 50/50.
    """

    def __init__(
        self,
        n_records: int,
        num_samples: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        """Draw from ``n_records`` records.

        Args:
            n_records: how many records there are (>= 1).
            num_samples: global stream length (None = infinite).
            seed: stream seed.
            rank: this process's rank.
            world_size: number of ranks.
        """
        if n_records < 1:
            raise ValueError(f"n_records must be >= 1, got {n_records}")
        super().__init__(num_samples, seed, rank, world_size)
        self.n_records = int(n_records)

    def _draw_block(self, rng: np.random.Generator, start: int, count: int) -> np.ndarray:
        return rng.integers(0, self.n_records, size=count)


class CurriculumSampler(_StreamSampler):
    """Stage 2: difficulty curriculum low 1-3 / medium 4-7 / high 8-11.

    The sample at global position ``p`` belongs to step ``p // global_batch_size``; its phase is set by
    ``step / total_steps``: 70/30/0 before 30 %, 30/60/10 before 70 %, then 10/50/40. A bucket is drawn
    with those proportions renormalised over the non-empty buckets (a phase whose buckets are all empty
    falls back to uniform over the non-empty ones), then a record uniformly within it (with
    replacement). The stream has ``total_steps * global_batch_size`` positions.

    Length grouping (``length_window = G > 0``): the samples drawn for each aligned window of ``G`` steps
    are sorted by ``lengths`` and cut into the window's ``G`` global batches, whose order is then
    shuffled. Each batch then holds records of similar length, so padding costs little (on the synthetic
    pre-training split, 5 % of the padded tokens instead of 30 % with 16-sample batches and ``G = 16``),
    while every window keeps the records and the curriculum mix it drew; a sample moves at most
    ``G - 1`` steps.
    """

    def __init__(
        self,
        difficulty,
        total_steps: int,
        global_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        lengths=None,
        length_window: int = 0,
    ):
        """Group the records by bucket.

        Args:
            difficulty: per-record difficulties 1..11 (e.g. ``dataset.index.difficulty``).
            total_steps: optimizer steps of the stage.
            global_batch_size: samples per step over all ranks (a multiple of ``world_size``).
            seed: stream seed.
            rank: this process's rank.
            world_size: number of ranks.
            lengths: per-record lengths (any proxy of the token count, e.g. the index's record bytes);
                needed only for length grouping.
            length_window: steps per length-grouping window (0: no grouping).
        """
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size ({global_batch_size}) must be a positive multiple of "
                f"world_size ({world_size})"
            )
        super().__init__(total_steps * global_batch_size, seed, rank, world_size)
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        levels = _as_metadata("difficulty", difficulty).astype(np.int64)
        if length_window < 0:
            raise ValueError(f"length_window must be >= 0, got {length_window}")
        self.length_window = length_window
        self._lengths = None
        if length_window:
            if lengths is None:
                raise ValueError("length_window > 0 needs lengths (one per record)")
            self._lengths = _as_metadata("lengths", lengths, len(levels))
            window = length_window * global_batch_size
            self.block_size = window * max(1, BLOCK // window)
        self._buckets = [
            np.flatnonzero((levels >= lo) & (levels <= hi)) for lo, hi in CURRICULUM_BUCKETS.values()
        ]
        present = np.array([len(b) > 0 for b in self._buckets], dtype=np.float64)
        last_present = int(np.flatnonzero(present)[-1])
        self._phase_probs, self._phase_cumulative = [], []
        for _, proportions in CURRICULUM_SCHEDULE:
            probs = np.asarray(proportions) * present
            if probs.sum() == 0:
                probs = present
            probs = probs / probs.sum()
            cumulative = np.cumsum(probs)
            # Exactly 1 from the last non-empty bucket on, so round-off never selects an empty bucket.
            cumulative[last_present:] = 1.0
            self._phase_probs.append(probs)
            self._phase_cumulative.append(cumulative)

    @property
    def buckets(self) -> list[np.ndarray]:
        """Positions (into ``difficulty``) of the low, medium and high buckets' records."""
        return list(self._buckets)

    def phase_of_step(self, step: int) -> int:
        """Which schedule phase (0, 1, 2) an optimizer step is in.

        Args:
            step: 0-based optimizer step.

        Returns:
            The phase index into ``CURRICULUM_SCHEDULE``.
        """
        fraction = step / self.total_steps
        for phase, (end, _) in enumerate(CURRICULUM_SCHEDULE):
            if fraction < end:
                return phase
        return len(CURRICULUM_SCHEDULE) - 1

    def bucket_probabilities(self, step: int) -> np.ndarray:
        """The (renormalised) low/medium/high probabilities at an optimizer step.

        Args:
            step: 0-based optimizer step.

        Returns:
            A length-3 array summing to 1.
        """
        return self._phase_probs[self.phase_of_step(step)]

    def _draw_block(self, rng: np.random.Generator, start: int, count: int) -> np.ndarray:
        bucket_u = rng.random(count)
        item_u = rng.random(count)
        steps = np.arange(start, start + count) // self.global_batch_size
        phase_ends = np.array([end for end, _ in CURRICULUM_SCHEDULE[:-1]])
        phases = np.searchsorted(phase_ends, steps / self.total_steps, side="right")
        cumulative = np.stack(self._phase_cumulative)[phases]  # [count, 3]
        buckets = (bucket_u[:, None] >= cumulative).sum(axis=1)
        out = np.empty(count, dtype=np.int64)
        for k, members in enumerate(self._buckets):
            chosen = buckets == k
            if chosen.any():
                out[chosen] = members[(item_u[chosen] * len(members)).astype(np.int64)]
        return out if self._lengths is None else self._group_by_length(out, rng)

    def _group_by_length(self, block: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # Blocks start on a window boundary and hold whole windows (see __init__'s block_size).
        windows = block.reshape(-1, self.length_window * self.global_batch_size)
        by_length = np.take_along_axis(windows, np.argsort(self._lengths[windows], axis=1, kind="stable"), 1)
        batches = by_length.reshape(len(windows), self.length_window, self.global_batch_size)
        order = rng.permuted(np.tile(np.arange(self.length_window), (len(windows), 1)), axis=1)
        return np.take_along_axis(batches, order[:, :, None], axis=1).reshape(-1)
