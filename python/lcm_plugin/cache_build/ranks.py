"""How the ranks of a multi-process build agree, and share the machine.

Agreement: the build runs in phases (the trainer's planning, rank 0's checks of the existing caches, encoding,
rank 0's manifests and bucket files, the trainer opening the caches). Each phase ends in exactly one
`group.gather` that every rank reaches, whatever raised where, carrying whether the rank's part went through; when
any rank's part failed, every rank raises (in the trainer: all ranks take SimpleTuner's own path, or none). A rank
that raised and left on its own would enter the next collective (SimpleTuner's, in the trainer) while the others
still wait in the build's: the collectives pair up wrongly, and on gloo a rank receives the other collective's data
or times out, on NCCL it hangs until the process group's timeout.

`group` is anything with `gather(list) -> list`, the concatenation of every rank's list in rank order
(`build._Group` over torch.distributed, `trainer_cache.AcceleratorGroup` over accelerate's process group).
"""

from __future__ import annotations

import hashlib
import os

from lcm_plugin.cache_build.plan import BuildError


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


def threads_per_rank(processes: int) -> int:
    """Worker threads for one rank's Rust pools: its share of this machine's cores. `LOCAL_WORLD_SIZE` (set by
    torchrun and `accelerate launch`) counts the ranks on this machine; without it, all `processes` are taken to be
    here, which never oversubscribes."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or processes)
    return max(1, (os.cpu_count() or 1) // max(1, local))
