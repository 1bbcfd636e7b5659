"""gradmagic under DistributedDataParallel with two real ranks (torchrun, gloo on 127.0.0.1).

`tests/distributed/train.py` trains each scenario plainly and watched on both ranks
and writes what happened; these tests check that both runs computed the same bits,
that DDP's gradients are what the math says (the mean of the ranks' own gradients,
or what the communication hook makes of them), and what the report shows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import gradmagic
from gradmagic import _engine
from gradmagic.capture.names import unwrapped_name
from tests import launch

SCRIPT = Path(__file__).resolve().parent / "distributed" / "train.py"
PARAMS = ["scale", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]  # the model's order
ROWS = [f"model.{p}" for p in PARAMS]


def torchrun(out: Path, *scenarios: str, timeout: float = 180) -> list[dict]:
    """Run the scenarios on 2 ranks; a run that does not finish in time fails the test."""
    command = launch.torchrun(str(SCRIPT), str(out), *scenarios)
    code, output, _ = launch.bounded(command, timeout=timeout, merge_stderr=True)
    assert code == 0, output[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    scenarios = (
        "plain",
        "nosync",
        "fp16",
        "sum",
        "check",
        "desync",
        "ignored",
        "branch",
        "magic",
        "dispatch",
    )
    return torchrun(out, *scenarios)


def _t(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _identical(rank: dict, mode: str) -> None:
    """The watched run computed exactly what the plain run computed."""
    plain, watched = rank[mode]["plain"], rank[mode]["watched"]
    assert watched["grads"] == plain["grads"]
    assert watched["params"] == plain["params"]
    assert watched["random"] == plain["random"]


def _rows(report: dict) -> dict[str, list]:
    return {name: [status, after] for name, status, after, _ in report["rows"]}


def _kinds(report: dict) -> list[str]:
    return [kind for kind, *_ in report["findings"]]


def _finding(report: dict, kind: str) -> list:
    (found,) = [f for f in report["findings"] if f[0] == kind]
    return found


def _mean(ranks: list[dict], mode: str, param: str) -> torch.Tensor:
    """What DDP's all-reduce makes of the ranks' own first gradients: it divides each by the
    world size, then sums (exact in float32: halving only moves the exponent)."""
    g0, g1 = (_t(r[mode]["local"][param]) for r in ranks)
    return g0 / 2 + g1 / 2


def _after_matches_the_plain_run(rank: dict, mode: str) -> None:
    """Each block's `after` is the gradient the plain run had after the same step."""
    for report, grads in zip(rank[mode]["watched"]["reports"], rank[mode]["plain"]["grads"]):
        rows = _rows(report)
        for param, row in zip(PARAMS, ROWS):
            assert torch.equal(_t(rows[row][1]), _t(grads[param])), (mode, row)


# --- what DDP did ------------------------------------------------------------------------------


@pytest.mark.slow
def test_plain_ddp_rows_are_named_as_the_model_and_hold_the_mean_over_ranks(ranks):
    for r, rank in enumerate(ranks):
        _identical(rank, "plain")
        _after_matches_the_plain_run(rank, "plain")
        first = _rows(rank["plain"]["watched"]["reports"][0])
        for param, row in zip(PARAMS, ROWS):
            assert torch.equal(_t(first[row][1]), _mean(ranks, "plain", param))
        for report in rank["plain"]["watched"]["reports"]:
            rows = _rows(report)
            assert list(rows) == ROWS  # not `model.module.fc1.weight`
            assert [status for status, _ in rows.values()] == ["new"] * 5
            assert report["errors"] == []
            assert report["headline"].startswith(f"gradmagic · rank {r}/2 · cell run ")
            assert report["text"] == report["headline"]
            assert report["html_has_rank"]
            assert report["saved"] == f"plain.rank{r}.html" and report["saved_exists"]
            assert report["printed"] == ""  # watch() prints nothing of its own
            assert _finding(report, "ddp") == [
                "ddp",
                "info",
                "`model` is a DistributedDataParallel over 2 ranks: in the backward, DDP "
                "all-reduced the gradients of its parameters and divided by 2: `.grad` holds "
                "their mean over the 2 ranks, the same on every rank, not this rank's own "
                "gradient.",
                ROWS,
            ]
            assert [k for k in _kinds(report) if k.startswith("ranks")] == []  # not asked
            assert [f for f in report["findings"] if f[1] != "info"] == []


@pytest.mark.slow
def test_no_sync_micro_batches_are_accumulation_not_a_forgotten_zero_grad(ranks):
    for rank in ranks:
        _identical(rank, "nosync")
        _after_matches_the_plain_run(rank, "nosync")
        first = _rows(rank["nosync"]["watched"]["reports"][0])
        for param, row in zip(PARAMS, ROWS):
            assert torch.equal(_t(first[row][1]), _mean(ranks, "nosync", param))
        for report in rank["nosync"]["watched"]["reports"]:
            rows = _rows(report)
            assert [status for status, _ in rows.values()] == ["new"] * 5
            assert "accumulated" not in _kinds(report)
            assert [f for f in report["findings"] if f[1] != "info"] == []
            assert _finding(report, "gradient-accumulation")[2] == (
                "4 backwards summed into the gradient of the step (`opt.step()`), and no step "
                "used a gradient an earlier step had used: gradient accumulation over "
                f"micro-batches ({', '.join(f'`{n}`' for n in ROWS[:4])} and 1 more)."
            )
            assert _finding(report, "ddp")[2] == (
                "`model` is a DistributedDataParallel over 2 ranks: in the backward, DDP "
                "all-reduced the gradients of its parameters and divided by 2: `.grad` holds "
                "their mean over the 2 ranks, the same on every rank, not this rank's own "
                "gradient. 3 of 4 forwards ran under `no_sync()`: their backwards added to "
                "`.grad` on this rank only, and a synchronised backward all-reduces all that "
                "`.grad` holds by then."
            )


@pytest.mark.slow
def test_fp16_compress_hook_is_named_and_its_rounding_said(ranks):
    for rank in ranks:
        _identical(rank, "fp16")
        _after_matches_the_plain_run(rank, "fp16")
        report = rank["fp16"]["watched"]["reports"][0]
        rows = _rows(report)
        for param, row in zip(PARAMS, ROWS):
            g0, g1 = (_t(r["fp16"]["local"][param]).half() / 2 for r in ranks)
            assert torch.equal(_t(rows[row][1]), (g0 + g1).float())
        assert _finding(report, "ddp")[2] == (
            "`model` is a DistributedDataParallel over 2 ranks: in the backward, DDP handed "
            "the gradients of its parameters to its communication hook `fp16_compress_hook`, "
            "which casts them to float16, divides them by 2, sums them over the ranks and "
            "casts back: the mean, rounded to float16."
        )


@pytest.mark.slow
def test_a_users_summing_hook_is_named_and_not_called_a_mean(ranks):
    for rank in ranks:
        _identical(rank, "sum")
        _after_matches_the_plain_run(rank, "sum")
        report = rank["sum"]["watched"]["reports"][0]
        rows = _rows(report)
        for param, row in zip(PARAMS, ROWS):
            g0, g1 = (_t(r["sum"]["local"][param]) for r in ranks)
            assert torch.equal(_t(rows[row][1]), g0 + g1)  # the sum: twice the mean
        assert _finding(report, "ddp")[2] == (
            "`model` is a DistributedDataParallel over 2 ranks: in the backward, DDP handed "
            "the gradients of its parameters to its communication hook `sum_hook`, which "
            "decided how: `.grad` holds what the hook returned, which is the mean over the "
            "ranks only if the hook divides their sum by 2."
        )


# --- the cross-rank check ------------------------------------------------------------------------


@pytest.mark.slow
def test_cross_rank_check_passes_on_a_healthy_run_and_changes_nothing(ranks):
    for rank in ranks:
        _identical(rank, "check")
        _after_matches_the_plain_run(rank, "check")
        for report in rank["check"]["watched"]["reports"]:  # the second block reuses the group
            assert _finding(report, "ranks-checked") == [
                "ranks-checked",
                "info",
                "Cross-rank check: `.grad` of each of the 5 parameters is the same, bit for bit, "
                "on both ranks when the block ended.",
                [],
            ]
            assert "ranks-differ" not in _kinds(report)
            assert report["errors"] == []


@pytest.mark.slow
def test_cross_rank_check_names_the_parameter_edited_on_one_rank(ranks):
    mean = _mean(ranks, "desync", "fc2.bias")
    for r, rank in enumerate(ranks):
        _identical(rank, "desync")
        # Rank 1 adds 0.5 to the all-reduced gradient after the backward: `after` (right
        # after the backward) is the mean on both ranks, `.grad` at the end is not.
        assert torch.equal(_t(rank["desync"]["plain"]["grads"][0]["fc2.bias"]), mean + 0.5 * r)
        first = rank["desync"]["watched"]["reports"][:1]
        for report in first:  # the second step starts from parameters that differ by rank
            rows = _rows(report)
            assert torch.equal(_t(rows["model.fc2.bias"][1]), mean)
            norms = [float(torch.linalg.vector_norm((mean + 0.5 * k).double())) for k in (0, 1)]
            assert _finding(report, "ranks-differ") == [
                "ranks-differ",
                "warning",
                "`.grad` of `model.fc2.bias` differs across ranks when the block ended: rank 1 "
                f"holds another gradient than rank 0 (‖g‖={norms[0]:.2g} on rank 0, "
                f"‖g‖={norms[1]:.2g} on rank 1 for `model.fc2.bias`). Data-parallel ranks "
                "should hold the same gradients: a desynchronised model, a rank-dependent "
                "branch, or a hook or edit that runs on one rank?",
                ["model.fc2.bias"],
            ]
            assert "ranks-checked" not in _kinds(report)


@pytest.mark.slow
def test_a_parameter_ddp_ignores_is_said_to_be_this_ranks_own_and_differs(ranks):
    # The script asks DDP to ignore `fc2.bias` and `scale`; DDP matches `{module}.{name}`,
    # which is `.scale` for the model's own parameter: `scale` is still all-reduced.
    for rank in ranks:
        _identical(rank, "ignored")
        _after_matches_the_plain_run(rank, "ignored")
        report = rank["ignored"]["watched"]["reports"][0]
        rows = _rows(report)
        assert torch.equal(_t(rows["model.fc2.bias"][1]), _t(rank["ignored"]["local"]["fc2.bias"]))
        for param in ("scale", "fc1.bias"):
            assert torch.equal(_t(rows[f"model.{param}"][1]), _mean(ranks, "ignored", param))
        assert _finding(report, "ddp") == [
            "ddp",
            "info",
            "`model` is a DistributedDataParallel over 2 ranks: in the backward, DDP "
            "all-reduced the gradients of its parameters except `model.fc2.bias` and divided "
            "by 2: `.grad` holds their mean over the 2 ranks, the same on every rank, not this "
            "rank's own gradient. `model.fc2.bias` is in DDP's `parameters_to_ignore`: its "
            "`.grad` is this rank's own.",
            ROWS,
        ]
        differ = _finding(report, "ranks-differ")
        assert differ[3] == ["model.fc2.bias"]  # not `model.scale`: DDP reduced it
        assert differ[2].startswith(
            "`.grad` of `model.fc2.bias` differs across ranks when the block ended: rank 1 "
            "holds another gradient than rank 0"
        )


@pytest.mark.slow
def test_a_parameter_only_another_rank_used_gets_its_gradient_from_the_all_reduce(ranks):
    # `find_unused_parameters=True`; rank 1's forward skips `scale`, rank 0's uses it.
    assert ranks[1]["branch"]["local"]["scale"] is None  # rank 1's own graph: no gradient
    mean = _t(ranks[0]["branch"]["local"]["scale"]) / 2  # rank 1 sends zeros
    for r, rank in enumerate(ranks):
        _identical(rank, "branch")
        _after_matches_the_plain_run(rank, "branch")
        report = rank["branch"]["watched"]["reports"][0]
        status, after = _rows(report)["model.scale"]
        assert status == "new" and torch.equal(_t(after), mean)
        message = _finding(report, "ddp")[2]
        elsewhere = (
            "`model.scale` was not on this rank's graph: its `.grad` is what the all-reduce "
            "brought from the other ranks."
        )
        assert message.endswith(elsewhere) == (r == 1)
        assert [f for f in report["findings"] if f[1] != "info"] == []  # nothing "missing"
        assert "ranks-checked" in _kinds(report)


@pytest.mark.slow
def test_a_users_dispatch_mode_sees_the_same_ops_with_the_check(ranks):
    for rank in ranks:
        seen = rank["dispatch"]
        assert seen["plain"] and seen["watched"] == seen["plain"]


@pytest.mark.slow
def test_the_magic_shows_its_report_on_rank_0_only(ranks):
    for r, rank in enumerate(ranks):
        shown = rank["magic"]
        assert shown["ok"]
        assert shown["headline"].startswith(f"gradmagic · rank {r}/2 · cell run 1 ")
        assert "ranks-checked" in shown["kinds"] and "ddp" in shown["kinds"]
        assert shown["stdout"] == ""
        if r == 0:
            (text,) = shown["shown"]
            assert text.startswith("gradmagic · rank 0/2 · cell run 1 ")
        else:
            assert shown["shown"] == []


@pytest.mark.slow
def test_a_check_only_one_rank_asks_for_times_out_with_a_sentence(tmp_path):
    rank0, rank1 = torchrun(tmp_path, "late", "timeout", timeout=120)
    same = "Cross-rank check: `.grad` of `w` is the same, bit for bit, on both ranks when the block ended."
    assert rank0["late"] == [[["ranks-checked", "info", same]], []]
    first, second = rank1["late"]
    assert first == [["ranks-checked", "info", same]]
    # Rank 0 never joins: the gather times out, or fails when rank 0's connection closes.
    ((kind, severity, message),) = second
    assert kind == "ranks-unchecked" and severity in ("warning", "info")
    assert message.startswith("The cross-rank check of the gradients did not run: ")
    assert [k for k, *_ in rank0["timeout"] if k.startswith("ranks")] == []
    assert [f for f in rank1["timeout"] if f[0].startswith("ranks")] == [
        [
            "ranks-unchecked",
            "warning",
            "The cross-rank check of the gradients did not run: the other ranks did not join "
            "it within 3 s (every rank must run this block with the check on).",
        ]
    ]


# --- in one process ------------------------------------------------------------------------------


def test_only_the_ddp_wrappers_module_leaves_the_names():
    wrappers = ["model", "outer.ddp"]
    assert unwrapped_name("model.module.fc1.weight", wrappers) == "model.fc1.weight"
    assert unwrapped_name("model.module", wrappers) == "model"
    assert unwrapped_name("model.modules.w", wrappers) == "model.modules.w"
    assert unwrapped_name("model.module.module.w", wrappers) == "model.module.w"  # the user's
    assert unwrapped_name("other.module.w", wrappers) == "other.module.w"
    assert unwrapped_name("outer.ddp.module.fc.bias", wrappers) == "outer.ddp.fc.bias"
    nested = ["m", "m.module.inner"]  # a DDP inside the model another DDP wraps
    assert unwrapped_name("m.module.inner.module.w", nested) == "m.inner.w"


def test_check_ranks_without_a_process_group_says_so_and_changes_nothing():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with gradmagic.watch({"w": w}, check_ranks=True) as rec:
        (w * 3).sum().backward()
    assert torch.equal(torch.get_rng_state(), state)
    rep = rec.report()
    assert [(f.kind, f.severity, f.message) for f in rep.findings] == [
        (
            "ranks-unchecked",
            "info",
            "The cross-rank check of the gradients did not run: torch.distributed is not "
            "initialised, so there is no other rank.",
        )
    ]
    # No rank in the headline without a process group (the run number depends on what ran
    # before in this process).
    assert re.fullmatch(
        r"gradmagic · cell run \d+ · 1 engine call \(backward\) · 1 leaf", rep.headline()
    )
    assert torch.equal(w.grad, torch.tensor([3.0, 3.0]))


def test_a_bad_rank_timeout_is_a_sentence():
    bad = "rank_timeout must be a number of seconds above 0"
    with pytest.raises(ValueError, match=bad), gradmagic.watch({}, rank_timeout=0):
        pass
    assert not _engine.is_patched()


@pytest.fixture
def gloo():
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{launch.free_port()}", rank=0, world_size=1
    )
    yield dist
    dist.destroy_process_group()


def test_one_rank_ddp_names_hook_and_check(gloo, tmp_path):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    net = nn.Linear(2, 1)
    model = DDP(net)
    assert _engine.ddp_comm_hook(model) == ("", None)
    model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    assert _engine.ddp_comm_hook(model) == ("fp16_compress_hook", default_hooks.fp16_compress_hook)
    x = torch.tensor([[1.0, 2.0]])
    with gradmagic.watch({"model": model}, check_ranks=True) as rec:
        model(x).sum().backward()
    rep = rec.report()
    assert [r.name for r in rep.rows] == ["model.weight", "model.bias"]
    assert torch.equal(rep["model.weight"].after, torch.tensor([[1.0, 2.0]]))
    assert rep.headline().startswith("gradmagic · cell run")  # one rank: no rank shown
    assert rep.save(tmp_path / "grad.html") == str(tmp_path / "grad.html")
    assert [(f.kind, f.message) for f in rep.findings] == [
        (
            "ddp",
            "`model` is a DistributedDataParallel over 1 rank: in the backward, DDP handed the "
            "gradients of its parameters to its communication hook `fp16_compress_hook`, which "
            "casts them to float16, divides them by 1, sums them over the ranks and casts back: "
            "the mean, rounded to float16.",
        ),
        (
            "ranks-unchecked",
            "The cross-rank check of the gradients did not run: the world size is 1, so there "
            "is no other rank.",
        ),
    ]


def test_a_ddp_subclass_with_children_of_its_own_keeps_module_in_names(gloo):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradmagic.capture.names import Namer

    class WithHead(DDP):
        def __init__(self, module: nn.Module) -> None:
            super().__init__(module)
            self.head = nn.Linear(1, 1)  # `model.weight` could be this one's or the model's

    plain, sub = DDP(nn.Linear(1, 1)), WithHead(nn.Linear(1, 1))
    namer = Namer({"plain": plain, "sub": sub})
    assert namer.name(plain.module.weight) == "plain.weight"
    assert namer.name(sub.module.weight) == "sub.module.weight"
    assert namer.name(sub.head.weight) == "sub.head.weight"


def test_micro_batches_under_no_sync_alone_are_not_a_forgotten_zero_grad(gloo):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(nn.Linear(2, 1))
    x = torch.tensor([[1.0, 2.0]])
    with gradmagic.watch({"model": model}) as rec:
        for _ in range(3):
            with model.no_sync():
                model(x).sum().backward()
    rep = rec.report()
    assert [(f.kind, f.severity, f.message) for f in rep.findings] == [
        (
            "ddp",
            "info",
            "`model` is a DistributedDataParallel over 1 rank, and all of its 3 forwards here "
            "ran under `no_sync()`: DDP did not all-reduce, so `.grad` is this rank's own "
            "gradient, summed over them on purpose (the first synchronised backward "
            "all-reduces the sum).",
        )
    ]
    assert torch.equal(rep["model.weight"].after, torch.tensor([[3.0, 6.0]]))
    # The same loop without DDP's no_sync() is still said to sum.
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    with gradmagic.watch({"w": w}) as rec:
        for _ in range(3):
            (w * 2).sum().backward()
    assert [f.kind for f in rec.report().findings] == ["accumulated"]


def test_a_forward_before_the_block_is_said_so(gloo):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(nn.Linear(2, 1))
    x = torch.tensor([[1.0, 2.0]])
    loss = model(x).sum()  # the forward, in an earlier cell
    with gradmagic.watch({"model": model, "loss": loss}) as rec:
        loss.backward()
    with model.no_sync():
        loss = model(x).sum()
    with gradmagic.watch({"model": model, "loss": loss}) as rec2:
        loss.backward()
    assert [f.message for f in rec.report().findings] == [
        "`model` is a DistributedDataParallel over 1 rank whose forward ran before this block: "
        "in the backward, DDP all-reduced the gradients of its parameters over its one rank, "
        "which leaves them as they were."
    ]
    assert [f.message for f in rec2.report().findings if f.kind == "ddp"] == [
        "`model` is a DistributedDataParallel over 1 rank whose forward ran before this block, "
        "under `no_sync()`: DDP did not all-reduce, so `.grad` is this rank's own gradient."
    ]


def test_builtin_comm_hook_is_named_from_ddps_logger(gloo):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(nn.Linear(2, 1))
    model._register_builtin_comm_hook(dist.BuiltinCommHookType.FP16_COMPRESS)
    assert _engine.ddp_comm_hook(model) == ("BuiltinCommHookType.FP16_COMPRESS", None)


def test_a_hooks_name_is_escaped_and_an_evaluation_forward_says_nothing(gloo):
    from torch.nn.parallel import DistributedDataParallel as DDP

    def make_hook():
        def hook(state, bucket):  # returns the bucket as it is: no communication
            done = torch.futures.Future()
            done.set_result(bucket.buffer())
            return done

        return hook

    model = DDP(nn.Linear(2, 1))
    model.register_comm_hook(None, make_hook())
    x = torch.tensor([[1.0, 2.0]])
    with gradmagic.watch({"model": model}) as rec, torch.no_grad():
        model(x)  # evaluation: no backward, nothing reduced
    assert [f.kind for f in rec.report().findings] == ["no-backward"]  # no "ddp"
    with gradmagic.watch({"model": model}) as rec:
        model(x).sum().backward()
    rep = rec.report()
    (finding,) = rep.findings
    assert ".<locals>.make_hook.<locals>.hook`, which decided how" in finding.message
    html = rep._repr_html_()
    assert "make_hook.&lt;locals&gt;.hook" in html and "<locals>" not in html
    assert torch.equal(model.module.weight.grad, torch.tensor([[1.0, 2.0]]))


def test_a_block_that_raised_takes_no_part_in_the_check():
    w = torch.tensor([1.0], requires_grad=True)
    with pytest.raises(ZeroDivisionError), gradmagic.watch({"w": w}, check_ranks=True) as rec:
        (w * 2).sum().backward()
        1 / 0  # noqa: B018
    assert [f.message for f in rec.report().findings if f.kind == "ranks-unchecked"] == [
        "The cross-rank check of the gradients did not run: the block raised on this rank, so "
        "this rank did not take part."
    ]
    assert not _engine.is_patched()


def test_the_magics_rank_options(ip, capsys):
    from IPython.core.error import UsageError

    ip.run("w = torch.tensor([1., 2.], requires_grad=True)")
    ip.run("%%grad --check-ranks --rank-timeout 5 --all-ranks -o rep\n(3 * w).sum().backward()\n")
    shown = capsys.readouterr().out
    assert shown.startswith("gradmagic · cell run 1 · ")  # outside torch.distributed: shown
    sentence = (
        "The cross-rank check of the gradients did not run: torch.distributed is not "
        "initialised, so there is no other rank."
    )
    assert sentence in shown
    assert [f.message for f in ip.ns["rep"].findings] == [sentence]
    with pytest.raises(UsageError, match="--rank-timeout must be above 0, not 0"):
        ip.shell.run_cell_magic("grad", "--check-ranks --rank-timeout 0", "pass\n")
