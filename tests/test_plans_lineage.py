import json

import numpy as np
import pytest

from jaxunlearn import deletions, plans
from jaxunlearn.lineage import Lineage


def test_chunks_in_order_and_cover_everything():
    chunks = plans.make_chunks(103, 5)
    assert [len(c) for c in chunks] == [21, 21, 21, 20, 20]
    np.testing.assert_array_equal(np.concatenate(chunks), np.arange(103))


def test_bootstrap_draws_from_working_set_without_deleted_ids():
    chunks = plans.make_chunks(100, 4)
    deleted = np.zeros(100, bool)
    deleted[[3, 7, 30]] = True
    rng = np.random.default_rng(0)
    samples = plans.draw_samples(rng, "bootstrap", 0.5, 4, chunks, 2, deleted)
    working = plans.working_set(chunks, 2, deleted)
    assert samples.shape == (4, len(working) // 2)
    assert np.isin(samples, working).all() and not deleted[samples].any()
    # With replacement: across 4 members of 23 draws from 47 ids, some id repeats within a member.
    assert any(len(np.unique(s)) < len(s) for s in samples)


def test_subset_draws_new_chunk_without_replacement():
    chunks = plans.make_chunks(100, 4)
    deleted = np.zeros(100, bool)
    deleted[60] = True
    samples = plans.draw_samples(np.random.default_rng(1), "subset", 0.4, 3, chunks, 3, deleted)
    assert samples.shape == (3, 9)  # 0.4 * 24 live ids of chunk 3 (50..74 minus 60)
    for s in samples:
        assert len(np.unique(s)) == len(s)
        assert ((s >= 50) & (s < 75)).all() and 60 not in s


def test_empty_sample_is_an_error():
    chunks = plans.make_chunks(10, 2)
    with pytest.raises(ValueError, match="gives each member 0"):
        plans.draw_samples(np.random.default_rng(0), "bootstrap", 0.1, 2, chunks, 1, np.zeros(10, bool))


def test_epoch_batches_feed_each_drawn_example_once_with_static_shape():
    samples = np.array([[5, 5, 9, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]])
    idx, weight = plans.epoch_batches(plans.member_rngs((0,), 1, 2), samples, 3)
    assert idx.shape == weight.shape == (3, 2, 3)  # ceil(7 / 3) steps, members, batch
    for m in range(2):
        fed = idx[:, m][weight[:, m] > 0]
        np.testing.assert_array_equal(np.sort(fed), np.sort(samples[m]))
    assert weight.sum() == samples.size


def test_ragged_batches_pad_short_members_and_keep_each_members_order():
    samples = [np.arange(10, 17), np.arange(3), np.zeros(0, np.int64)]
    idx, weight = plans.epoch_batches(plans.member_rngs((4, 2), 1, 3), samples, 3)
    assert idx.shape == (3, 3, 3)  # the longest sample (7) sets ceil(7 / 3) steps
    assert weight[:, 0].sum() == 7 and weight[:, 1].sum() == 3 and weight[:, 2].sum() == 0
    assert weight[1:, 1].sum() == 0  # member 1 is done after one step
    # Member 0's order depends on its own generator and sample only, not on the others.
    alone, _ = plans.epoch_batches(plans.member_rngs((4, 2), 1, 1), samples[:1], 3)
    np.testing.assert_array_equal(alone[:, 0], idx[:, 0])


def test_shards_are_disjoint_and_cover_each_chunk():
    chunks = plans.make_chunks(103, 3)
    shards = plans.make_shards(np.random.default_rng(0), chunks, members=4, slices=2)
    for chunk, parts in zip(chunks, shards):
        pieces = [s for member in parts for s in member]
        together = np.concatenate(pieces)
        assert len(together) == len(np.unique(together))  # disjoint
        np.testing.assert_array_equal(np.sort(together), chunk)  # cover the chunk
        assert all(len(member) == 2 for member in parts)
    deleted = np.zeros(103, bool)
    deleted[shards[0][1][0][0]] = True
    first = plans.shard_samples(shards, 1, 1, deleted)
    assert len(first) == 4 and not deleted[np.concatenate(first)].any()
    # Stage (2, 2): a member's whole shard of chunk 1 and both slices of its shard of chunk 2.
    full = plans.shard_samples(shards, 2, 2, np.zeros(103, bool))
    for member in range(4):
        want = np.concatenate(shards[0][member] + shards[1][member])
        np.testing.assert_array_equal(full[member], want)


def test_expected_invalidation_probabilities():
    pool = np.arange(100)
    ids = np.array([3, 50])
    assert plans.avoid_probability("bootstrap", pool, np.zeros(10), ids) == (1 - 2 / 100) ** 10
    # subset: 10 draws of 100 without replacement avoid 2 given ids with C(98,10)/C(100,10).
    want = (90 * 89) / (100 * 99)
    assert abs(plans.avoid_probability("subset", pool, np.zeros(10), ids) - want) < 1e-12
    assert plans.avoid_probability("shards", None, np.array([1, 3]), ids) == 0.0
    assert plans.avoid_probability("shards", None, np.array([1, 2]), ids) == 1.0
    # Monte Carlo agrees with the bootstrap formula.
    rng = np.random.default_rng(0)
    draws = rng.choice(pool, size=(20000, 10))
    hit = np.isin(draws, ids).any(axis=1).mean()
    assert abs(hit - (1 - (1 - 2 / 100) ** 10)) < 0.01


def test_lineage_is_cumulative_and_reset_clears_it():
    lineage = Lineage.empty(2, 10)
    lineage.record(np.array([[[1, 2], [3, 4]]]), np.ones((1, 2, 2)))  # phase 1
    lineage.record(np.array([[[5, 0], [6, 7]]]), np.array([[[1, 0], [1, 1]]]))  # phase 2, pad
    assert set(np.flatnonzero(lineage.seen[0])) == {1, 2, 5}
    assert set(np.flatnonzero(lineage.seen[1])) == {3, 4, 6, 7}
    assert lineage.invalid([2]).tolist() == [True, False]
    assert lineage.violations([2, 6, 9]) == 2
    lineage.reset(np.array([True, False]), phase=2)
    assert not lineage.seen[0].any() and lineage.born.tolist() == [2, 0]
    assert lineage.violations([2, 6, 9]) == 1


def test_lineage_ignores_inactive_members():
    lineage = Lineage.empty(2, 5)
    lineage.record(np.array([[[1], [2]]]), np.ones((1, 2, 1)), active=np.array([False, True]))
    assert not lineage.seen[0].any() and lineage.seen[1, 2]


def test_schedule_file_roundtrip_and_validation(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"1": [3, 1], "2": [25]}))
    schedule = deletions.load_schedule(path)
    assert schedule == {1: [3, 1], 2: [25]}
    deletions.validate_schedule(schedule, plans.make_chunks(40, 2))


@pytest.mark.parametrize("schedule, message", [
    ({3: [1]}, "phases 1..2"),
    ({1: [99]}, "does not exist"),
    ({1: [-1]}, "does not exist"),
    ({1: [30]}, "have arrived"),
    ({1: [4, 4]}, "listed twice"),
    ({1: [4], 2: [4]}, "already deleted"),
    ({1: list(range(20))}, "every example"),
])
def test_schedule_errors(schedule, message):
    with pytest.raises(deletions.ScheduleError, match=message):
        deletions.validate_schedule(schedule, plans.make_chunks(40, 2))


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "JSON object"), ('{"1": [1.5]}', "integer example ids"),
    ('{"one": [1]}', "not an integer"), ("{1: [}", "not valid JSON"),
])
def test_schedule_file_errors(tmp_path, text, message):
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(deletions.ScheduleError, match=message):
        deletions.load_schedule(path)


def test_random_deletions_follow_the_rate():
    working = np.arange(1000)
    ids = deletions.random_deletions(np.random.default_rng(0), working[5:], 0.003, arrived=1000)
    assert len(ids) == 3 and len(set(ids.tolist())) == 3 and np.isin(ids, working[5:]).all()
    assert deletions.random_deletions(np.random.default_rng(0), working, 0.0001, 1000).size == 0
    # The original's counts: 1e-4 of 10,000 .. 40,000 arrived examples.
    counts = [len(deletions.random_deletions(np.random.default_rng(0), working, 1e-4, n))
              for n in (10_000, 20_000, 30_000, 40_000)]
    assert counts == [1, 2, 3, 4]
