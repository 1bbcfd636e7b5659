"""Leaves are named the way the user knows them."""

from __future__ import annotations

import re
import sys

import torch
from torch import nn

import gradmagic


def _names(ns, loss_fn):
    with gradmagic.watch(ns) as rec:
        loss_fn().backward()
    rep = rec.report()
    return rep, list(rep.table.index)


def test_containers_optimizers_and_positions():
    params = [torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)]
    d = {"w": torch.ones(1, requires_grad=True)}
    hidden = torch.ones(2, requires_grad=True)
    opt = torch.optim.SGD([hidden], lr=0.1)
    orphan = [torch.ones(1, requires_grad=True)]

    def loss():
        return (
            (params[0] * 2).sum()
            + params[1].sum()
            + d["w"].sum()
            + hidden.sum()
            + orphan[0].sum() * 0
        )

    ns = {"params": params, "d": d, "opt": opt}
    rep, names = _names(ns, loss)
    assert "params[0]" in names and "params[1]" in names and "d['w']" in names
    assert "opt.param_groups[0]['params'][0]" in names
    # Not reachable from the namespace: named by where it sits in the graph.
    [fallback] = [n for n in names if n.startswith("leaf #")]
    assert re.fullmatch(r"leaf #\d+ of SumBackward0", fallback)


def test_tied_weights_keep_every_name():
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    rep, names = _names({"model": model}, lambda: head(emb(torch.tensor([1, 2]))).sum())
    assert names == ["model.emb.weight"]
    assert rep["model.emb.weight"].names == ["model.emb.weight", "model.head.weight"]


def test_a_variable_outranks_a_module_path_and_duplicates_are_numbered():
    lin = nn.Linear(2, 1)
    w = lin.weight
    rep, names = _names({"lin": lin, "w": w}, lambda: lin(torch.ones(1, 2)).sum())
    assert names[0] == "w" and rep["w"].names == ["w", "lin.weight"]

    def two_leaves_called_v():
        total = 0
        for _ in range(2):
            v = torch.ones(1, requires_grad=True)
            total = total + v.sum()
        return total

    def run():
        return two_leaves_called_v()

    # The helper's frame holds the second `v` when it returns; the first was
    # overwritten there, and is named by its place in the graph.
    _, names = _names({"run": run}, run)
    assert "v" in names and len(names) == 2


def _profile_inside(ns, source=None):
    seen = []
    with gradmagic.watch(ns, source=source):
        seen.append(sys.getprofile())
    return seen[0] is not None


def test_the_naming_hook_runs_only_where_user_code_can_make_leaves():
    model, x = nn.Linear(2, 1), torch.ones(1, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def helper():
        return model(x)

    class Trainer:
        pass

    plain = {"model": model, "x": x, "opt": opt, "F": torch.nn.functional, "torch": torch}
    # Modules, optimizers, tensors and library functions: no profile hook at all.
    assert not _profile_inside(plain)
    assert not _profile_inside({**plain, "helper": helper}, "loss = F.mse_loss(model(x), x)")
    # The user's function, class or object, named in the code or (without code) in
    # the namespace, or a function defined in the code itself: the hook is on.
    assert _profile_inside({**plain, "helper": helper}, "loss = helper().sum()")
    assert _profile_inside({**plain, "helper": helper})
    assert _profile_inside({**plain, "t": Trainer()}, "t.go()")
    assert _profile_inside(plain, "def f():\n    return model(x)\nf()")
    assert _profile_inside(None)
    assert sys.getprofile() is None


def test_the_naming_hook_is_off_inside_module_calls_and_optimizer_steps():
    seen = {}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, x):
            seen["forward"] = sys.getprofile()
            return self.lin(x)

    def helper():
        seen["helper"] = sys.getprofile()

    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.register_step_pre_hook(lambda *a: seen.setdefault("step", sys.getprofile()))
    with gradmagic.watch({"net": net, "helper": helper}):
        net(torch.ones(1, 2)).sum().backward()
        seen["between"] = sys.getprofile()
        opt.step()
        helper()
    assert seen["forward"] is None and seen["step"] is None
    assert seen["between"] is not None and seen["helper"] is not None
    assert sys.getprofile() is None
