"""Say only what is so: the patterns of real training code, each with the exact finding
(or its absence) and the exact values the report shows."""

from __future__ import annotations

import math
import socket
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradmagic
from gradmagic import stats


def _kinds(rep) -> list[str]:
    return [f.kind for f in rep.findings]


def _finding(rep, kind):
    [found] = [f for f in rep.findings if f.kind == kind]
    return found


def _serious(rep) -> list[str]:
    return [f.message for f in rep.findings if f.severity in ("error", "warning")]


def _linear(seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Linear(3, 1), torch.randn(8, 3), torch.randn(8, 1)


def _micro_batch_grads(model: nn.Linear, x: torch.Tensor, y: torch.Tensor, k: int) -> list:
    """The gradient of each micro-batch's `loss / k`, computed apart."""
    out = []
    for i in range(k):
        w = model.weight.detach().clone().requires_grad_()
        b = model.bias.detach().clone().requires_grad_()
        xb, yb = x[2 * i : 2 * i + 2], y[2 * i : 2 * i + 2]
        (nn.functional.mse_loss(xb @ w.T + b, yb) / k).backward()
        out.append((w.grad, b.grad))
    return out


# --- accumulation: deliberate and forgotten ----------------------------------------------------


def test_micro_batch_accumulation_is_said_as_intended_not_as_a_forgotten_zero_grad():
    model, x, y = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    k = 4
    expected = _micro_batch_grads(model, x, y, k)
    with gradmagic.watch({"model": model, "opt": opt}) as rec:
        for i in range(k):
            xb, yb = x[2 * i : 2 * i + 2], y[2 * i : 2 * i + 2]
            (nn.functional.mse_loss(model(xb), yb) / k).backward()
        opt.step()
        opt.zero_grad()
    rep = rec.report()
    assert _serious(rep) == []
    assert _finding(rep, "gradient-accumulation").message == (
        "4 backwards summed into the gradient of the step (`opt.step()`), and no step used a "
        "gradient an earlier step had used: gradient accumulation over micro-batches "
        "(`model.weight` and `model.bias`)."
    )
    row = rep["model.weight"]
    # What the step used is the sum of the four micro-batches' gradients, as float32 sums it.
    total = expected[0][0] + expected[1][0] + expected[2][0] + expected[3][0]
    assert torch.allclose(row.after, total, rtol=1e-6, atol=1e-7)
    assert torch.equal(row.used, row.after) and row.stepped
    assert (row.status, row.runs) == ("new", 1)
    [then] = row.then
    assert (then.what, then.after) == ("set to None", None)


def test_accumulation_cycles_zeroed_by_the_data_are_not_accumulation_either():
    model, x, y = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmagic.watch({"model": model, "opt": opt}) as rec:
        for _ in range(3):
            for i in range(2):
                xb, yb = x[2 * i : 2 * i + 2], y[2 * i : 2 * i + 2]
                (nn.functional.mse_loss(model(xb), yb) / 2).backward()
            opt.step()
            for p in model.parameters():
                p.grad.data.zero_()  # the older tutorials' zeroing: no version bump
    rep = rec.report()
    assert _serious(rep) == []
    assert _finding(rep, "gradient-accumulation").message.startswith(
        "2 backwards summed into the gradient of each of 3 steps (`opt.step()`)"
    )
    row = rep["model.bias"]
    assert row.status == "new" and [c.what for c in row.then] == ["zeroed"]
    assert torch.equal(row.end, torch.zeros(1))


@pytest.mark.parametrize(
    "zeroing",
    [
        "p.grad.data.zero_()",
        "p.grad.data.fill_(0)",
        "p.grad.data = torch.zeros_like(p.grad)",
        "p.grad = None",
        "p.grad.zero_()",
    ],
)
def test_zeroing_between_runs_in_any_spelling_starts_afresh(ip, zeroing):
    ip.run("w = torch.tensor([1., 2.], requires_grad=True)")
    cell = f"%%grad -q -o rep\nfor p in [w]:\n    if p.grad is not None:\n        {zeroing}\n(3 * w).sum().backward()\n"
    ip.run(cell)
    ip.run(cell)
    rep = ip.ns["rep"]
    assert "accumulated" not in _kinds(rep)
    row = rep["w"]
    assert (row.status, row.runs) == ("new", 1)
    assert torch.equal(row.after, torch.tensor([3.0, 3.0]))
    # The reading before the backward: zeros (or None), not the 3s the last run left.
    assert row.before is None or torch.equal(row.before, torch.zeros(2))


def test_a_step_that_reuses_gradients_says_so_and_each_sum_is_right(ip):
    ip.run("w = torch.tensor([1., 2.], requires_grad=True)\nopt = torch.optim.SGD([w], lr=0.1)")
    ip.run("%%grad -q -o rep\nfor _ in range(3):\n    (3 * w).sum().backward()\n    opt.step()\n")
    rep = ip.ns["rep"]
    finding = _finding(rep, "accumulated")
    assert finding.severity == "warning" and finding.tensors == ("w",)
    assert finding.message == (
        "backward ran 3 times in this cell and `w` summed them: nothing zeroed the gradient in "
        "between, so each `opt.step()` used the sum of all gradients so far; if each step "
        "should start afresh, call `opt.zero_grad()` before each `backward()`."
    )
    # The last step used 3 + 3 + 3: the sum the steps reused.
    assert torch.equal(rep["w"].used, torch.tensor([9.0, 9.0]))
    assert rep["w"].status == "accumulated"


def test_the_within_cell_sum_is_still_said_when_the_cell_runs_again(ip):
    ip.run("x = torch.tensor([1., 2.], requires_grad=True)")
    cell = "%%grad -q -o rep\nfor _ in range(3):\n    (2 * x).sum().backward()\n"
    ip.run(cell)
    first = [f.message for f in ip.ns["rep"].findings]
    ip.run(cell)
    second = [f.message for f in ip.ns["rep"].findings]
    summed = (
        "backward ran 3 times in this cell and `x` summed every one: nothing zeroed the "
        "gradient in between and no optimizer step used it yet."
    )
    assert [m for m in first if m.startswith(summed)]
    assert [m for m in second if m.startswith(summed)]  # not hidden by the cross-run one
    assert [m for m in second if "was not zeroed: this run added to the gradient left by 1" in m]
    assert torch.equal(ip.ns["rep"]["x"].after, torch.tensor([12.0, 12.0]))


# --- changes between backward and step ---------------------------------------------------------


def test_clipping_shows_the_value_the_optimizer_used_and_says_what_clipped_it():
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    with gradmagic.watch({"w": w, "opt": opt}) as rec:
        (5 * w).sum().backward()  # grad [5, 5], norm 7.07
        torch.nn.utils.clip_grad_norm_([w], max_norm=1.0)
        opt.step()
    rep = rec.report()
    row = rep["w"]
    assert torch.equal(row.after, torch.tensor([5.0, 5.0]))  # right after the backward
    coefficient = 1.0 / (math.sqrt(50.0) + 1e-6)
    clipped = torch.tensor([5.0, 5.0]) * torch.tensor(coefficient, dtype=torch.float32)
    assert torch.equal(row.used, clipped)  # what the step used
    [then] = row.then
    assert (then.what, then.by) == (
        "scaled",
        "`clip_grad_norm_(max_norm=1)` (total norm 7.071)",
    )
    assert then.factor == pytest.approx(coefficient)
    assert _finding(rep, "changed-after-backward").message == (
        "after backward, `clip_grad_norm_(max_norm=1)` (total norm 7.071) scaled the gradients "
        "of `w` by 0.14: the optimizer step used the changed values."
    )
    assert torch.equal(rep.steps[0].params[0].grad, clipped)
    assert _serious(rep) == []


def test_manual_loss_scaling_is_no_exploding_gradient():
    model, x, y = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmagic.watch({"model": model, "opt": opt}) as rec:
        (nn.functional.mse_loss(model(x), y) * 65536).backward()
        for p in model.parameters():
            p.grad.data.div_(65536)  # unscaled by hand, through .data: no version bump
        opt.step()
    rep = rec.report()
    assert "exploding" not in _kinds(rep)
    row = rep["model.bias"]
    assert torch.equal(row.used, row.after / 65536)  # a power of two: exact
    [then] = row.then
    assert (then.what, then.by, then.factor) == ("scaled", "", 1 / 65536)
    assert _finding(rep, "changed-after-backward").message == (
        "after backward, the gradients of `model.weight` and `model.bias` were scaled by 1.5e-5 "
        "by code that is not a PyTorch gradient function (a write such as "
        "`p.grad.data.mul_()` or `p.grad /= k`): the optimizer step used the changed values."
    )


def test_grad_scaler_unscale_and_a_skipped_step():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x = torch.randn(3, 4)
    ns = {"model": model, "opt": opt, "scaler": scaler}
    with gradmagic.watch(ns) as rec:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    rep = rec.report()
    row = rep["model.bias"]
    assert torch.equal(row.used, row.after / 2.0**16)
    [then] = row.then
    assert (then.what, then.by) == ("scaled", "`scaler.unscale_(opt)` (÷65536)")
    assert rep.backwards[0].loss_scale == 2.0**16
    assert _serious(rep) == []
    # An inf in the input: the unscaled gradients hold NaN/Inf and the step is skipped.
    before = [p.detach().clone() for p in model.parameters()]
    x[0, 0] = float("inf")
    with gradmagic.watch(ns) as rec:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    rep = rec.report()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert _finding(rep, "skipped-step").message.startswith(
        "`scaler.step(opt)` skipped 1 optimizer step (of 1): the unscaled gradients held NaN or "
        "Inf, so the parameters did not move."
    )
    nan = _finding(rep, "nan-inf")
    assert nan.severity == "warning"
    assert nan.message.endswith("`scaler.step(opt)` skipped the step that would have used them.")
    assert rep.steps == []  # no optimizer step ran


# --- checkpointing ------------------------------------------------------------------------------


class Blocks(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.second = nn.Linear(3, 1)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(self.first, x, use_reentrant=self.reentrant)
        return self.second(torch.relu(h))


@pytest.mark.parametrize("reentrant", [True, False])
def test_parameters_inside_a_checkpoint_get_their_rows(reentrant):
    torch.manual_seed(0)
    net = Blocks(reentrant)
    x = torch.randn(4, 3, requires_grad=reentrant)  # reentrant needs an input that requires grad
    reference = Blocks(reentrant)
    reference.load_state_dict(net.state_dict())
    reference(x.detach().requires_grad_(reentrant)).sum().backward()
    with gradmagic.watch({"net": net, "x": x}) as rec:
        net(x).sum().backward()
    rep = rec.report()
    names = [r.name for r in rep.rows]
    assert sorted(names) == sorted(
        ["net.first.weight", "net.first.bias", "net.second.weight", "net.second.bias"]
        + (["x"] if reentrant else [])
    )  # no row for the inputs torch detaches inside the checkpoint
    for row in rep.rows:
        if row.name != "x":
            expected = dict(reference.named_parameters())[row.name.removeprefix("net.")].grad
            assert torch.equal(row.after, expected) or torch.allclose(
                torch.as_tensor(row.after.norm), expected.norm(), rtol=1e-6
            )
    assert {r.status for r in rep.rows} == {"new"}
    assert _serious(rep) == []


# --- failures and cuts --------------------------------------------------------------------------


def test_a_failed_backward_makes_no_claim_about_leaves_it_never_reached(ip):
    ip.run(
        "w = torch.tensor([1., 2.], requires_grad=True)\nv = torch.tensor([3.], requires_grad=True)"
    )
    ip.run("loss = (w * 2).sum()\nloss.backward()")  # frees the graph
    result = ip.run_raw(
        "%%grad -q -o rep\nloss.backward(gradient=torch.tensor(2.))\nother = v * 1\n"
    )
    assert "second time" in str(result.error_in_exec)
    rep = ip.ns["rep"]
    assert _kinds(rep) == ["double-backward"]  # no `none` rows for v, no gradient= claim
    assert rep.rows == []


def test_a_cut_is_named_as_a_cut_not_as_an_unused_tensor(ip):
    ip.run(
        "w = torch.tensor([1., 2.], requires_grad=True)\nv = torch.tensor([3., 4.], requires_grad=True)"
    )
    ip.run("%%grad -q -o rep\nh = (w * 2).detach()\nloss = (h * v).sum()\nloss.backward()\n")
    rep = ip.ns["rep"]
    finding = _finding(rep, "no-grad")
    assert finding.tensors == ("w",)
    assert finding.message == (
        "`w` required grad but received none: the path from the loss to it is cut at line 2: "
        "`(w * 2).detach()`: `.detach()` returns a tensor without a graph."
    )
    assert torch.equal(rep["v"].after, torch.tensor([2.0, 4.0]))


# --- many calls, tiny and huge numbers ----------------------------------------------------------


def test_gradcheck_makes_one_finding_with_a_count():
    x = torch.randn(3, dtype=torch.double, requires_grad=True)
    with gradmagic.watch({"x": x}) as rec:
        assert torch.autograd.gradcheck(torch.sin, (x,))
    rep = rec.report()
    [finding] = rep.findings
    calls = len([b for b in rep.backwards if b.kind == "grad"])
    assert calls > 4
    assert finding.message == (
        f"`torch.autograd.grad` was called {calls} times (by `gradcheck`). Its results are "
        "returned, not stored in `.grad`, so `.grad` was not touched."
    )


def test_norms_are_right_for_tiny_and_for_huge_float32_gradients():
    tiny = torch.full((100,), 1e-30)
    assert stats.norms([tiny])[0] == pytest.approx(1e-29, rel=1e-6)  # float32 squares: 0
    assert str(stats.read_values([tiny], 16, False)[0]).startswith("n=100 ‖g‖=1.00e-29")
    torch.manual_seed(0)
    big = torch.randn(5_000_000) * 1e-3 + 1e-4
    exact = float(big.double().norm())
    assert stats.norms([big])[0] == pytest.approx(exact, rel=3e-6)  # was 2e-4 in float32


def test_a_report_built_after_the_gradients_were_zeroed_draws_what_was_recorded():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
    with gradmagic.watch({"model": model}, plot=True) as rec:
        model(torch.randn(2, 4)).sum().backward()
    model.zero_grad()  # gone before anyone asks for the report
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = rec.report()
        svg = rep.flow.svg()
    assert all(p.rms and p.max_abs for p in rep.flow.points)
    assert "RMS" in svg


# --- tensor subclasses in an optimizer step ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gloo():
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    yield dist
    dist.destroy_process_group()


def test_dtensor_parameters_step_and_report_as_this_ranks_shard(gloo):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    w = nn.Parameter(distribute_tensor(torch.arange(32, dtype=torch.float32), mesh, [Replicate()]))
    opt = torch.optim.SGD([w], lr=0.5)
    with gradmagic.watch({"w": w, "opt": opt}) as rec:
        (w * 2).sum().backward()
        opt.step()  # raised before: `.tolist()` of a DTensor inside the step hook
    rep = rec.report()
    assert rec.internal_errors == []
    assert torch.equal(w.to_local(), torch.arange(32, dtype=torch.float32) - 1.0)
    row = rep["w"]
    assert row.status == "new"
    # Every element's gradient is 2. A replicated DTensor holds the whole tensor on every
    # rank: its statistics are the whole gradient's, with no shard to speak of.
    assert str(row.after) == f"n=32 ‖g‖={2 * math.sqrt(32):.4g} x∈[2, 2]"


def test_ddp_no_sync_accumulation_is_said_as_intended(gloo):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, x, y = _linear()
    plain = nn.Linear(3, 1)
    plain.load_state_dict(model.state_dict())
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    with gradmagic.watch({"ddp": ddp, "opt": opt}) as rec:
        for i in range(4):
            xb, yb = x[2 * i : 2 * i + 2], y[2 * i : 2 * i + 2]
            if i < 3:
                with ddp.no_sync():
                    (nn.functional.mse_loss(ddp(xb), yb) / 4).backward()
            else:
                (nn.functional.mse_loss(ddp(xb), yb) / 4).backward()
        opt.step()
    rep = rec.report()
    assert _serious(rep) == []
    assert _finding(rep, "gradient-accumulation").message.startswith(
        "4 backwards summed into the gradient of the step (`opt.step()`)"
    )
    nn.functional.mse_loss(plain(x), y).backward()  # four quarter-batch means: one mean
    assert torch.allclose(rep["ddp.weight"].used, plain.weight.grad, rtol=1e-5)


def test_a_large_gradient_moved_to_other_memory_is_the_same_content():
    # BLAS rounds a norm by memory alignment: the same numbers elsewhere may differ in their
    # last bits, and must not be said to have changed.
    torch.manual_seed(0)
    w = torch.zeros(3_000_000, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    with gradmagic.watch({"w": w, "opt": opt}) as rec:
        (w * torch.randn(3_000_000)).sum().backward()
        buffer = torch.empty(3_000_001)
        buffer[1:] = w.grad  # the same values, one float off the old alignment
        w.grad = buffer[1:]
        opt.step()
    rep = rec.report()
    assert rep["w"].then == [] and "changed-after-backward" not in _kinds(rep)
    assert rep["w"].stepped
