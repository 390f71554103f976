"""lcm_plugin.cache_build.ranks: phases end in one gather on every rank and fail together; the ranks' plans are
compared; each rank's Rust pools get its share of the cores. Ranks are threads here, meeting in an in-process
gather (tests/integration/test_rank_agreement.py runs real gloo ranks)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from lcm_plugin.cache_build.plan import BuildError
from lcm_plugin.cache_build.ranks import (
    MACHINE_MARK,
    Crew,
    Phase,
    RankFailed,
    RanksDisagree,
    plan_on_every_rank,
    require_same_plan,
    threads_per_rank,
)


class ThreadGroup:
    """`gather` across threads standing for ranks; counts the gathers each rank made."""

    def __init__(self, world: int):
        self.slots: list = [None] * world
        self.meeting = threading.Barrier(world, timeout=10)
        self.gathers = [0] * world

    def rank(self, rank: int):
        group = self

        class Member:
            def gather(self, value: list) -> list:
                group.gathers[rank] += 1
                group.slots[rank] = list(value)
                group.meeting.wait()
                gathered = [x for part in group.slots for x in part]
                group.meeting.wait()  # nobody overwrites a slot before every rank has read them all
                return gathered

        return Member()


def run_ranks(world: int, body) -> tuple[list, list[int]]:
    """body(group, rank) on `world` threads: (each rank's return value or raised exception, the number of gathers
    each rank made), in rank order."""
    group = ThreadGroup(world)

    def outcome(rank: int):
        try:
            return body(group.rank(rank), rank)
        except Exception as error:  # noqa: BLE001 - the test looks at it
            return error

    with ThreadPoolExecutor(world) as pool:
        outcomes = list(pool.map(outcome, range(world)))
    return outcomes, group.gathers


def two_phases(fail_rank: int | None, fail_phase: str):
    def body(group, rank):
        with Phase(group, "checks") as checks:
            if (rank, "checks") == (fail_rank, fail_phase):
                raise ValueError("bad shard")
            checks.share(rank * 10)
        with Phase(group, "encoding") as encoding:
            if (rank, "encoding") == (fail_rank, fail_phase):
                raise MemoryError("out of memory")
            encoding.share([f"img{rank}"])
        return checks.shared, encoding.shared

    return body


def test_every_rank_learns_what_each_rank_shared():
    outcomes, gathers = run_ranks(3, two_phases(None, ""))
    assert outcomes == [([0, 10, 20], [["img0"], ["img1"], ["img2"]])] * 3
    assert gathers == [2, 2, 2]


@pytest.mark.parametrize(("fail_rank", "fail_phase"), [(0, "checks"), (2, "checks"), (1, "encoding")])
def test_a_failure_on_one_rank_stops_every_rank_after_the_same_gathers(fail_rank, fail_phase):
    outcomes, gathers = run_ranks(3, two_phases(fail_rank, fail_phase))
    own = outcomes[fail_rank]
    assert type(own) is (ValueError if fail_phase == "checks" else MemoryError)  # its own error, unchanged
    why = "ValueError: bad shard" if fail_phase == "checks" else "MemoryError: out of memory"
    for rank, outcome in enumerate(outcomes):
        if rank != fail_rank:
            assert isinstance(outcome, RankFailed) and isinstance(outcome, BuildError)
            assert outcome.failures == {fail_rank: why}
            assert str(outcome) == f"rank {fail_rank} failed during {fail_phase}: {why}"
    assert len(set(gathers)) == 1, gathers  # the same collectives on every rank: none left waiting
    assert gathers[0] == (1 if fail_phase == "checks" else 2)


def test_every_failed_rank_is_named():
    def body(group, rank):
        with Phase(group, "encoding"):
            if rank:
                raise RuntimeError(f"rank {rank} broke")

    outcomes, _ = run_ranks(3, body)
    assert str(outcomes[0]) == ("rank 1 failed during encoding: RuntimeError: rank 1 broke; "
                                "rank 2 failed during encoding: RuntimeError: rank 2 broke")


def test_different_plans_are_refused_on_every_rank():
    require_same_plan([("abc", 4), ("abc", 4)])
    with pytest.raises(BuildError, match=r"planned different work \(rank 0: 4 image\(s\), rank 1: 3 image\(s\)\)"):
        require_same_plan([("abc", 4), ("abd", 3)])


@pytest.mark.parametrize(
    ("cores", "local_world_size", "processes", "threads"),
    [(64, "8", 16, 8), (64, None, 8, 8), (8, "", 1, 8), (3, "2", 2, 1), (2, "8", 8, 1)],
)
def test_each_rank_gets_its_share_of_the_cores(monkeypatch, cores, local_world_size, processes, threads):
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    if local_world_size is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    assert threads_per_rank(processes) == threads


def test_the_other_ranks_take_the_first_ranks_memo_without_reading_the_folder(tmp_path):
    """What a machine's first rank scanned, and wrote as its memo, is the inventory of the other ranks as it lies on
    disk: found by the token the first rank shares, with no file of the folder listed, stat'ed or read (the folder
    is emptied here), and the same plan as a scan of the folder. A token that no longer names the memo gets a scan
    of their own."""
    import shutil

    from planned_folder import PRINTS, planned_folder

    from lcm_plugin.cache_build.fingerprint import name_entries
    from lcm_plugin.cache_build.plan import datasets_of, memo_tokens, read_run, scan_dataset, shared_memos

    images = {"a.png": (64, 64), "sub/b.png": (128, 64), "sub/c d.png": (64, 96), "é.png": (32, 32)}
    scanned = planned_folder(tmp_path, images, {"a.png": "a cat", "sub/b.png": "two\nlines", "é.png": "ü"})
    settings, entries = read_run(tmp_path)
    (first,) = datasets_of(settings, entries)
    scan_dataset(first, settings.seed, remember=True)
    shared = shared_memos([memo_tokens([first]), []])  # rank 0 shared its token, rank 1 (not a first rank) none
    assert len(shared) == 1

    shutil.rmtree(tmp_path / "data")
    (tmp_path / "data").mkdir()
    (other,) = datasets_of(settings, entries)
    scan_dataset(other, settings.seed, shared_memos=shared)
    name_entries([other], PRINTS)
    for column in ("keys", "sizes", "contents", "captions", "caption_errors"):
        assert getattr(other.inventory, column) == getattr(scanned.inventory, column), column
    assert other.inventory.read == 0 and other.inventory.memo_token in shared
    assert other.images.table.digest() == scanned.images.table.digest()
    assert [str(path) for path, _ in other.excluded] == [str(path) for path, _ in scanned.excluded]

    (stranger,) = datasets_of(settings, entries)
    scan_dataset(stranger, settings.seed, shared_memos={(time + 1, crc) for time, crc in shared})
    assert len(stranger.inventory) == 0  # its own scan of the folder as it is now


def crews(folders_of_rank: list[list], first_ranks: set[int]) -> list:
    """Each rank's crew (or what it raised) from `plan_on_every_rank` when rank r's plan puts its stores in
    `folders_of_rank[r]` (a VAE and a text cache folder) and the ranks in `first_ranks` are their machine's first."""
    from types import SimpleNamespace

    def body(group, rank):
        vae, text = folders_of_rank[rank]
        planned = (None, [SimpleNamespace(vae_cache_dir=vae, text_cache_dir=text, memo_token=None)], None)
        _, crew = plan_on_every_rank(group, rank, rank in first_ranks, lambda memos: planned)
        return crew

    outcomes, _ = run_ranks(len(folders_of_rank), body)
    return outcomes


def test_ranks_that_see_the_same_cache_folders_fill_them_together(tmp_path):
    shared = [tmp_path / "vae", tmp_path / "text"]
    # one machine of two ranks; two machines of two ranks on shared storage
    assert crews([shared] * 2, {0}) == [Crew((0, 1), 0), Crew((0, 1), 1)]
    assert crews([shared] * 4, {0, 2}) == [Crew((0, 1, 2, 3), rank) for rank in range(4)]
    assert [path.name for folder in shared for path in folder.iterdir()] == []  # the marks are gone


def test_machines_with_cache_folders_of_their_own_each_fill_theirs(tmp_path):
    machine = {name: [tmp_path / name / "vae", tmp_path / name / "text"] for name in ("a", "b")}
    outcomes = crews([machine["a"], machine["a"], machine["b"], machine["b"]], {0, 2})
    assert outcomes == [Crew((0, 1), 0), Crew((0, 1), 1), Crew((2, 3), 2), Crew((2, 3), 3)]
    assert [(crew.index, crew.size, crew.leader, crew.leads) for crew in outcomes] == [
        (0, 2, 0, True), (1, 2, 0, False), (0, 2, 2, True), (1, 2, 2, False)]
    assert not any(path.name.startswith(MACHINE_MARK) for path in tmp_path.rglob("*"))


def test_cache_folders_shared_by_some_machines_only_are_refused_on_every_rank(tmp_path):
    vae = tmp_path / "shared-vae"
    outcomes = crews([[vae, tmp_path / "a-text"], [vae, tmp_path / "b-text"]], {0, 1})
    for outcome in outcomes:
        assert isinstance(outcome, RanksDisagree), outcome
        assert str(outcome).startswith(f"{vae}: the run's machines share some of its cache folders but not all")
    three = crews([[vae, vae], [vae, vae], [tmp_path / "own"] * 2], {0, 1, 2})  # two machines share a folder, the third has its own
    assert all(isinstance(outcome, RanksDisagree) for outcome in three), three
