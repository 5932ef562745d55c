import itertools

import numpy as np
import pytest

from wmtp_train.data.samplers import BLOCK, BalancedSampler, CurriculumSampler, UniformSampler


def metadata(n=300, seed=0):
    rng = np.random.default_rng(seed)
    difficulty = rng.integers(1, 12, size=n)
    # Skewed labels: 80 % incorrect, so a plain uniform sampler would not be balanced.
    is_correct = rng.random(n) < 0.2
    return is_correct, difficulty


def take(sampler, k):
    return list(itertools.islice(iter(sampler), k))


def test_balanced_sampler_is_fifty_fifty_across_difficulties():
    is_correct, difficulty = metadata()
    drawn = np.array(take(BalancedSampler(is_correct, difficulty, seed=1), 20000))
    assert abs(is_correct[drawn].mean() - 0.5) < 0.02
    for label in (False, True):
        levels = difficulty[drawn[is_correct[drawn] == label]]
        counts = np.bincount(levels, minlength=12)[1:]
        present = np.unique(difficulty[is_correct == label])
        assert set(np.flatnonzero(counts) + 1) == set(present)
        # Uniform over the difficulties present for that label.
        share = counts[present - 1] / counts.sum()
        assert np.all(np.abs(share - 1 / len(present)) < 0.02)


def test_balanced_sampler_with_one_label_missing_uses_the_other():
    difficulty = np.array([1, 2, 3, 4])
    drawn = take(BalancedSampler(np.zeros(4, bool), difficulty, seed=0), 100)
    assert set(drawn) <= {0, 1, 2, 3} and len(set(drawn)) == 4


def test_uniform_sampler_keeps_the_records_label_mix():
    is_correct, _ = metadata()
    drawn = np.array(take(UniformSampler(len(is_correct), seed=1), 20000))
    assert set(np.unique(drawn)) == set(range(len(is_correct)))
    assert abs(is_correct[drawn].mean() - is_correct.mean()) < 0.02  # not pulled to 50/50
    assert take(UniformSampler(300, seed=1), 50) == drawn[:50].tolist()
    with pytest.raises(ValueError, match="n_records"):
        UniformSampler(0)


def test_sampler_is_deterministic_from_seed():
    is_correct, difficulty = metadata()
    a = take(BalancedSampler(is_correct, difficulty, seed=5), 500)
    b = take(BalancedSampler(is_correct, difficulty, seed=5), 500)
    c = take(BalancedSampler(is_correct, difficulty, seed=6), 500)
    assert a == b and a != c


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_slices_of_each_global_batch(world_size):
    is_correct, difficulty = metadata()
    per_rank_batch = 4
    steps = 5
    n = per_rank_batch * world_size * steps
    global_stream = take(BalancedSampler(is_correct, difficulty, num_samples=n, seed=3), n)
    shards = [
        list(BalancedSampler(is_correct, difficulty, num_samples=n, seed=3, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    assert all(len(s) == n // world_size for s in shards)
    for step in range(steps):
        positions = set()
        for rank in range(world_size):
            local = range(step * per_rank_batch, (step + 1) * per_rank_batch)
            rank_positions = {i * world_size + rank for i in local}
            assert not positions & rank_positions
            positions |= rank_positions
            assert [shards[rank][i] for i in local] == [global_stream[i * world_size + rank] for i in local]
        # Together the ranks cover exactly this global batch's positions.
        g = per_rank_batch * world_size
        assert positions == set(range(step * g, (step + 1) * g))


@pytest.mark.parametrize("k", [0, 7, BLOCK + 3])
def test_resume_mid_epoch_continues_identically(k):
    is_correct, difficulty = metadata()
    n = 2 * BLOCK + 10
    reference = list(BalancedSampler(is_correct, difficulty, num_samples=n, seed=9, rank=1, world_size=2))
    sampler = BalancedSampler(is_correct, difficulty, num_samples=n, seed=9, rank=1, world_size=2)
    consumed = take(sampler, k)
    state = sampler.state_dict()
    resumed = BalancedSampler(is_correct, difficulty, num_samples=n, seed=9, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert consumed + list(resumed) == reference
    with pytest.raises(ValueError, match="seed"):
        BalancedSampler(is_correct, difficulty, seed=10).load_state_dict(state)


def test_finished_pass_rolls_over_to_a_new_epoch():
    is_correct, difficulty = metadata()
    sampler = BalancedSampler(is_correct, difficulty, num_samples=50, seed=0)
    first, second = list(sampler), list(sampler)
    assert len(first) == len(second) == 50 and first != second
    assert sampler.state_dict()["epoch"] == 2
    sampler.set_epoch(0)
    assert list(sampler) == first


@pytest.mark.parametrize("length_window", [0, 5])
def test_curriculum_schedule_proportions(length_window):
    difficulty = np.repeat(np.arange(1, 12), 20)
    lengths = np.random.default_rng(0).integers(10, 500, size=len(difficulty))
    total_steps, gbs = 100, 40
    sampler = CurriculumSampler(
        difficulty,
        total_steps=total_steps,
        global_batch_size=gbs,
        seed=2,
        lengths=lengths,
        length_window=length_window,  # 5 steps: windows end on the phase boundaries (30, 70)
    )
    drawn = np.array(list(sampler))
    assert len(drawn) == total_steps * gbs
    bucket = np.digitize(difficulty[drawn], [4, 8])  # 0 low, 1 medium, 2 high
    steps = np.arange(len(drawn)) // gbs
    expected = {(0, 30): (0.7, 0.3, 0.0), (30, 70): (0.3, 0.6, 0.1), (70, 100): (0.1, 0.5, 0.4)}
    for (lo, hi), proportions in expected.items():
        in_phase = bucket[(steps >= lo) & (steps < hi)]
        share = np.bincount(in_phase, minlength=3) / len(in_phase)
        assert np.allclose(share, proportions, atol=0.03), (lo, hi, share)
    assert (bucket[steps < 30] != 2).all()  # high is never drawn in the first phase
    assert [sampler.phase_of_step(s) for s in (0, 29, 30, 69, 70, 99)] == [0, 0, 1, 1, 2, 2]


def test_curriculum_renormalises_over_non_empty_buckets():
    difficulty = np.array([1, 2, 9, 10])  # no medium
    sampler = CurriculumSampler(difficulty, total_steps=10, global_batch_size=1000, seed=0)
    assert np.allclose(sampler.bucket_probabilities(0), [1.0, 0.0, 0.0])
    assert np.allclose(sampler.bucket_probabilities(5), [0.75, 0.0, 0.25])
    assert np.allclose(sampler.bucket_probabilities(9), [0.2, 0.0, 0.8])
    drawn = np.array(list(sampler))
    assert set(difficulty[drawn]) == {1, 2, 9, 10}
    assert (difficulty[drawn[:3000]] < 4).all()


@pytest.mark.parametrize("length_window", [0, 3])
def test_curriculum_resume_and_sharding(length_window):
    difficulty = np.repeat(np.arange(1, 12), 5)
    lengths = np.arange(len(difficulty))[::-1]
    kwargs = dict(
        total_steps=20,
        global_batch_size=6,
        seed=4,
        world_size=3,
        lengths=lengths,
        length_window=length_window,
    )
    full = [list(CurriculumSampler(difficulty, rank=r, **kwargs)) for r in range(3)]
    assert all(len(f) == 40 for f in full)
    sampler = CurriculumSampler(difficulty, rank=2, **kwargs)
    head = take(sampler, 11)
    resumed = CurriculumSampler(difficulty, rank=2, **kwargs)
    resumed.load_state_dict(sampler.state_dict())
    assert head + list(resumed) == full[2]


def padded_share(lengths, batches):
    longest = lengths[batches].max(axis=-1, keepdims=True)
    return 1 - lengths[batches].sum() / np.broadcast_to(longest, batches.shape).sum()


def test_length_grouping_batches_records_of_similar_length_in_shuffled_order():
    rng = np.random.default_rng(3)
    difficulty, lengths = rng.integers(1, 12, size=500), rng.integers(20, 400, size=500)
    window, gbs, steps = 8, 16, 64
    common = dict(total_steps=steps, global_batch_size=gbs, seed=5)
    grouped = CurriculumSampler(difficulty, lengths=lengths, length_window=window, **common)
    drawn = np.array(list(grouped)).reshape(steps // window, window, gbs)
    ascending_windows = 0
    for batches in drawn:
        by_shortest = sorted(batches, key=lambda b: lengths[b].min())
        # Cut from one sorted list: no two batches of a window interleave in length.
        for shorter, longer in zip(by_shortest, by_shortest[1:]):
            assert lengths[shorter].max() <= lengths[longer].min()
        ascending_windows += all((lengths[a].min() <= lengths[b].min()) for a, b in zip(batches, batches[1:]))
    assert ascending_windows < len(drawn) / 2  # batch order shuffled, not short-to-long
    plain = np.array(list(CurriculumSampler(difficulty, **common))).reshape(steps, gbs)
    assert padded_share(lengths, drawn.reshape(steps, gbs)) < padded_share(lengths, plain) / 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rank=2, world_size=2), "rank"),
        (dict(world_size=0), "world_size"),
        (dict(num_samples=1, world_size=2), "num_samples"),
    ],
)
def test_sampler_rejects_bad_arguments(kwargs, message):
    is_correct, difficulty = metadata(10)
    with pytest.raises(ValueError, match=message):
        BalancedSampler(is_correct, difficulty, **kwargs)


def test_curriculum_rejects_bad_arguments():
    with pytest.raises(ValueError, match="global_batch_size"):
        CurriculumSampler([1, 2], total_steps=10, global_batch_size=3, world_size=2)
    with pytest.raises(ValueError, match="total_steps"):
        CurriculumSampler([1, 2], total_steps=0, global_batch_size=2)
    with pytest.raises(ValueError, match="length_window > 0 needs lengths"):
        CurriculumSampler([1, 2], total_steps=2, global_batch_size=2, length_window=4)
    with pytest.raises(ValueError, match="length_window must be >= 0"):
        CurriculumSampler([1, 2], total_steps=2, global_batch_size=2, lengths=[3, 4], length_window=-1)
    with pytest.raises(ValueError, match="lengths has 3 entries, expected 2"):
        CurriculumSampler([1, 2], total_steps=2, global_batch_size=2, lengths=[3, 4, 5], length_window=1)
    with pytest.raises(ValueError, match="difficulty has 3 entries"):
        BalancedSampler([True, False], [1, 2, 3])
    with pytest.raises(TypeError, match="infinite"):
        len(BalancedSampler([True], [1]))
