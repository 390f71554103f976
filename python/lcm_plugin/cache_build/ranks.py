"""How the ranks of a multi-process build agree, and share the machine.

Agreement: the build runs in phases (planning, the checks of the existing caches, encoding, the manifests and
bucket files, the trainer opening the caches). Each phase ends in exactly one
`group.gather` that every rank reaches, whatever raised where, carrying whether the rank's part went through; when
any rank's part failed, every rank raises (in the trainer: all ranks take SimpleTuner's own path, or none). A rank
that raised and left on its own would enter the next collective (SimpleTuner's, in the trainer) while the others
still wait in the build's: the collectives pair up wrongly, and on gloo a rank receives the other collective's data
or times out, on NCCL it hangs until the process group's timeout.

Crews: while the ranks plan, each machine's first rank leaves a mark file in every cache folder of the run, and
which marks each rank then sees (`crew_of`) tells whether the folders are storage the machines share (one crew of
every rank fills them once) or each machine's own (each machine's ranks fill its folders whole: every machine then
serves every image from local disk, having encoded every image itself).

`group` is anything with `gather(list) -> list`, the concatenation of every rank's list in rank order
(`build._Group` over torch.distributed, `trainer_cache.AcceleratorGroup` over accelerate's process group).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from lcm_plugin.cache_build.plan import BuildError, memo_tokens, shared_memos


class RanksDisagree(BuildError):
    """Raised alike on every rank whose own part went through, when the ranks cannot go on together: another rank
    failed (`RankFailed`), or the ranks' results do not fit together."""


class RankFailed(RanksDisagree):
    """Another rank's part of a phase failed while this rank's went through."""

    def __init__(self, phase: str, failures: dict[int, str]):
        self.phase = phase
        self.failures = failures  # rank -> "<error type>: <message>"
        super().__init__("; ".join(f"rank {rank} failed during {phase}: {why}"
                                   for rank, why in sorted(failures.items())))


class RanksLost(RanksDisagree):
    """A phase's gather failed: another rank died (killed, out of memory) or cannot be reached."""


class Phase:
    """A block every rank runs, then the ranks learn each other's outcome:

        with Phase(group, "encoding") as encoding:
            ...                    # this rank's part
            encoding.share(value)  # what the other ranks learn from this one (optional)
        encoding.shared            # every rank's shared value, in rank order

    Leaving the block, every rank gathers every rank's outcome (one `group.gather`, also when the block raised). If any
    rank's part raised, every rank raises: a rank whose own part failed its own error, unchanged (a single-process
    `cache build` reports it as before), the others `RankFailed`, naming each failed rank and its error."""

    def __init__(self, group, name: str):
        self.group = group
        self.name = name
        self.shared: list = []
        self._value = None

    def share(self, value) -> None:
        self._value = value

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if error is not None and not isinstance(error, Exception):
            return False  # KeyboardInterrupt, SystemExit: this process ends, which breaks the others' next collective
        why = None if error is None else f"{type(error).__name__}: {error}"
        try:
            outcomes = self.group.gather([(why, self._value)])
        except Exception as lost:  # noqa: BLE001 - a peer died or the network broke: no outcome to agree on
            if error is not None:
                return False  # this rank's own error says more
            raise RanksLost(f"lost contact with the other ranks during {self.name} ({type(lost).__name__}: "
                            f"{str(lost).splitlines()[0] if str(lost) else 'no detail'}); rerun every rank: "
                            "committed work is kept") from None
        if error is not None:
            return False  # this rank's own error goes on up
        failures = {rank: why for rank, (why, _) in enumerate(outcomes) if why is not None}
        if failures:
            raise RankFailed(self.name, failures)
        self.shared = [value for _, value in outcomes]
        return False


def plan_summary(datasets, prints) -> tuple[str, int]:
    """(digest, image count) of a plan. Ranks split the batches by position (rank r takes batches r, r + N, ...), so
    their shares add up to the whole only when every rank planned the same images, keys and captions: each
    dataset's table digest (its store keys and caption files) and the caption rule that reads them."""
    from lcm_plugin.cache_build.plan import caption_rule

    digest = hashlib.sha256(f"{prints.latent_digest} {prints.text_digest}".encode())
    for dataset in datasets:
        digest.update("\0".join(["", dataset.id, caption_rule(dataset), dataset.images.table.digest()]).encode())
    return digest.hexdigest(), sum(len(dataset.images) for dataset in datasets)


def require_same_plan(summaries: list[tuple[str, int]]) -> None:
    """Raises RanksDisagree (on every rank alike, given the same gathered `summaries`) when the ranks' plans differ."""
    if len({digest for digest, _ in summaries}) > 1:
        counts = ", ".join(f"rank {rank}: {images} image(s)" for rank, (_, images) in enumerate(summaries))
        raise RanksDisagree(f"the ranks planned different work ({counts}); every rank must read the same config and "
                         "files (did a dataset change while the ranks scanned it?)")


# A file each machine's first rank leaves in every cache folder while the ranks plan: which machines see it tells
# whether the folder is shared storage or each machine's own.
MACHINE_MARK = ".lcm-machine-"


@dataclass(frozen=True)
class Crew:
    """The ranks that fill one copy of the run's stores, and this rank's place among them. When every rank sees the
    same cache folders (one machine, or storage the machines share), one crew of every rank fills them; when each
    machine has folders of its own (a local `cache_dir_vae` per machine), each machine's ranks are a crew and fill
    its own copy whole, so that every machine serves every image from local disk."""

    members: tuple[int, ...]  # global ranks, ascending
    rank: int

    @property
    def index(self) -> int:
        """This rank's share: batches and caption chunks index, index + size, ..."""
        return self.members.index(self.rank)

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def leader(self) -> int:
        """The rank that checks and repairs the crew's stores and writes their manifests, completion records and
        SimpleTuner's bucket files."""
        return self.members[0]

    @property
    def leads(self) -> bool:
        return self.rank == self.leader


def cache_folders(datasets) -> list[Path]:
    """The folders the run's stores live in, in config order (the same list on every rank)."""
    return list(dict.fromkeys([d.vae_cache_dir for d in datasets] + [d.text_cache_dir for d in datasets]))


def mark_folders(folders: list[Path]) -> str:
    """Leaves a file named for this machine in each of `folders` (made when missing); returns its name."""
    mark = MACHINE_MARK + secrets.token_hex(8)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / mark).touch()
    return mark


def unmark_folders(folders: list[Path], mark: str) -> None:
    for folder in folders:
        (folder / mark).unlink(missing_ok=True)


def marks_seen(folders: list[Path], marks: list[str]) -> list[tuple[str, ...]]:
    """Per folder, which of the machines' `marks` this rank sees in it."""
    return [tuple(mark for mark in marks if (folder / mark).exists()) for folder in folders]


def crew_of(seen: list[list[tuple[str, ...]]], marks: list[str], folders: list[Path], rank: int) -> Crew:
    """This rank's crew, from what every rank saw (`seen`, in rank order: `marks_seen` of each) of every machine's
    mark. Raises RanksDisagree, alike on every rank, when a folder is shared by some machines and not by others, or
    shared while another is not: the stores could then be neither filled once nor once per machine."""
    everyone = tuple(marks)
    if all(in_folder == everyone for by_rank in seen for in_folder in by_rank):
        return Crew(tuple(range(len(seen))), rank)
    machine_of = []
    for by_rank in seen:
        odd = [folder for folder, in_folder in zip(folders, by_rank) if len(in_folder) != 1 or in_folder != by_rank[0]]
        if odd:
            raise RanksDisagree(f"{odd[0]}: the run's machines share some of its cache folders but not all, or share a "
                             "folder with some machines only; give every machine the same cache folders (shared "
                             "storage) or each machine folders of its own (a local cache_dir_vae and text cache_dir)")
        machine_of.append(by_rank[0][0])
    return Crew(tuple(r for r, machine in enumerate(machine_of) if machine == machine_of[rank]), rank)


def plan_on_every_rank(group, rank: int, first_on_machine: bool, plan, check=None):
    """The two planning phases every rank goes through: each machine's first rank plans with `plan(None)` (scanning,
    its memos written) and marks the run's cache folders; then the other ranks plan with `plan(memos)` (the tokens of
    the memos the first ranks wrote, which they map instead of scanning), `check(planned)` runs on every rank that
    planned, and every rank reports the marks it sees. `plan` returns (settings, datasets, prints) or None (nothing
    to build). Returns (planned, this rank's Crew), or (None, None) on every rank when none planned; raises
    RanksDisagree when some ranks planned and others did not."""
    planned, mark = None, None
    try:
        with Phase(group, "planning on each machine's first rank") as first:
            if first_on_machine:
                planned = plan(None)
                mark = mark_folders(cache_folders(planned[1])) if planned else None
            first.share((memo_tokens(planned[1]) if planned else [], mark))
        marks = [shared_mark for _, shared_mark in first.shared if shared_mark]
        with Phase(group, "planning") as planning:
            if not first_on_machine:
                planned = plan(shared_memos([tokens for tokens, _ in first.shared]))
            if planned and check is not None:
                check(planned)
            planning.share(marks_seen(cache_folders(planned[1]), marks) if planned else None)
    finally:
        if mark is not None:
            unmark_folders(cache_folders(planned[1]), mark)
    if len({seen is None for seen in planning.shared}) > 1:
        idle = [other for other, seen in enumerate(planning.shared) if seen is None]
        raise RanksDisagree(f"rank(s) {', '.join(map(str, idle))} found no dataset to build where the others did; "
                            "every rank must read the same config and files")
    if planned is None:
        return None, None
    return planned, crew_of(planning.shared, marks, cache_folders(planned[1]), rank)


def threads_per_rank(processes: int) -> int:
    """Worker threads for one rank's Rust pools: its share of this machine's cores. `LOCAL_WORLD_SIZE` (set by
    torchrun and `accelerate launch`) counts the ranks on this machine; without it, all `processes` are taken to be
    here, which never oversubscribes."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or processes)
    return max(1, (os.cpu_count() or 1) // max(1, local))
