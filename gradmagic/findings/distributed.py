"""torch.distributed: what DistributedDataParallel did to the gradients, and whether
the ranks hold the same ones (the check `check_ranks=True` asks for)."""

from __future__ import annotations

from collections.abc import Iterator

from .. import stats
from ..records import BlockRecord, DDPFact, RankGradient
from ._base import Finding, listing, plural, rule, sci


def _ranks(n: int) -> str:
    return plural(n, "rank")


def _ddp_sentence(fact: DDPFact, ignored: list[str], elsewhere: list[str]) -> str:
    who = f"`{fact.name}`" if fact.name else "A DistributedDataParallel module"
    n = fact.world_size
    forwards = fact.synced + fact.unsynced
    params = f"its parameters except {listing(ignored)}" if ignored else "its parameters"
    if fact.forward_before and not fact.synced:
        text = (
            f"{who} is a DistributedDataParallel over {_ranks(n)} whose forward ran before "
            "this block, under `no_sync()`: DDP did not all-reduce, so `.grad` is this "
            "rank's own gradient"
        )
    elif not fact.synced:
        text = (
            f"{who} is a DistributedDataParallel over {_ranks(n)}, and all of its "
            f"{plural(forwards, 'forward')} here ran under `no_sync()`: DDP did not "
            "all-reduce, so `.grad` is this rank's own gradient"
        )
        if forwards > 1:
            text += (
                ", summed over them on purpose (the first synchronised backward all-reduces "
                "the sum)"
            )
    else:
        before = " whose forward ran before this block" if fact.forward_before else ""
        text = f"{who} is a DistributedDataParallel over {_ranks(n)}{before}: in the backward, DDP "
        if fact.hook:
            what = fact.hook_known or (
                "decided how: `.grad` holds what the hook returned, which is the mean over the "
                f"ranks only if the hook divides their sum by {n}"
            )
            text += (
                f"handed the gradients of {params} to its communication hook "
                f"`{fact.hook}`, which {what}"
            )
        elif n == 1:
            text += (
                f"all-reduced the gradients of {params} over its one rank, which leaves them "
                "as they were"
            )
        else:
            text += (
                f"all-reduced the gradients of {params} and divided by {n}: `.grad` holds "
                f"their mean over the {_ranks(n)}, the same on every rank, not this rank's own "
                "gradient"
            )
        if fact.unsynced:
            text += (
                f". {fact.unsynced} of {plural(forwards, 'forward')} ran under `no_sync()`: "
                "their backwards added to `.grad` on this rank only, and a synchronised "
                "backward all-reduces all that `.grad` holds by then"
            )
    if elsewhere and fact.synced:
        one = len(elsewhere) == 1
        text += (
            f". {listing(elsewhere)} {'was' if one else 'were'} not on this rank's graph: "
            f"{'its' if one else 'their'} `.grad` is what the all-reduce brought from the other "
            "ranks"
        )
    if ignored:
        one = len(ignored) == 1
        text += (
            f". {listing(ignored)} {'is' if one else 'are'} in DDP's `parameters_to_ignore`: "
            f"{'its' if one else 'their'} `.grad` is this rank's own"
        )
    return text + "."


@rule
def ddp_reduced(block: BlockRecord) -> Iterator[Finding]:
    """What each DDP that ran did, where a backward reached its parameters."""
    leaves = block.leaves
    for fact in block.ddp:
        reached = [leaves[k] for k in fact.leaf_keys if leaves[k].backwards]
        ignored = [leaves[k] for k in fact.ignored_keys if leaves[k].backwards]
        if not reached and not ignored:
            continue
        names = [r.name for r in reached + ignored]
        yield Finding(
            "ddp",
            "info",
            _ddp_sentence(
                fact,
                [r.name for r in ignored],
                [r.name for r in reached if not r.in_graph and not stats.is_empty(r.after)],
            ),
            tuple(names),
        )


def _norm(value: RankGradient | None) -> str:
    if value is None:
        return "no row (no backward reached it)"
    if value.shape is None:
        return "no `.grad`"
    return f"‖g‖={sci(value.norm)}"


def _same(a: RankGradient | None, b: RankGradient | None) -> bool:
    """Whether two ranks' fingerprints agree (None: the rank has no row for it)."""
    if a is None or b is None:
        return a is b
    return (a.shape, a.dtype, a.checksum) == (b.shape, b.dtype, b.checksum)


def _rank_list(ranks: list[int]) -> str:
    words = [str(r) for r in ranks]
    joined = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
    return f"rank{'s' if len(ranks) > 1 else ''} {joined}"


@rule
def ranks_differ(block: BlockRecord) -> Iterator[Finding]:
    """The cross-rank check: parameters whose `.grad` differs between ranks."""
    check = block.rank_check
    if check is None:
        return
    if check.error:
        yield Finding(
            "ranks-unchecked",
            "warning" if check.timed_out else "info",
            f"The cross-rank check of the gradients did not run: {check.error}.",
        )
        return
    grads = check.grads
    names = list(dict.fromkeys(name for per_rank in grads for name in per_rank))
    names = [n for n in names if n not in check.skipped]
    by_ranks: dict[tuple[int, ...], list[str]] = {}
    for name in names:
        reference = grads[0].get(name)
        others = tuple(r for r in range(1, len(grads)) if not _same(reference, grads[r].get(name)))
        if others:
            by_ranks.setdefault(others, []).append(name)
    for others, differing in by_ranks.items():
        first = differing[0]
        values = ", ".join(f"{_norm(grads[r].get(first))} on rank {r}" for r in (0, *others))
        verb = "differs" if len(differing) == 1 else "differ"
        yield Finding(
            "ranks-differ",
            "warning",
            f"`.grad` of {listing(differing)} {verb} across ranks when the block ended: "
            f"{_rank_list(list(others))} {'holds' if len(others) == 1 else 'hold'} another "
            f"gradient than rank 0 ({values} for `{first}`). Data-parallel ranks should hold "
            "the same gradients: a desynchronised model, a rank-dependent branch, or a hook or "
            "edit that runs on one rank?",
            tuple(differing),
        )
    if not by_ranks:
        where = "both ranks" if check.world_size == 2 else f"all {check.world_size} ranks"
        if len(names) == 1:
            text = (
                f"Cross-rank check: `.grad` of `{names[0]}` is the same, bit for bit, on "
                f"{where} when the block ended"
            )
        elif names:
            text = (
                f"Cross-rank check: `.grad` of each of the {len(names)} parameters is the same, "
                f"bit for bit, on {where} when the block ended"
            )
        else:
            text = "Cross-rank check: no parameter had a row to compare"
        if check.skipped:
            text += f" ({listing(list(check.skipped))} not compared: {next(iter(check.skipped.values()))})"
        yield Finding("ranks-checked", "info", text + ".")
