"""Run under `python -m torch.distributed.run` by tests/test_fsdp.py: FSDP2 on CPU with gloo.

Each rank trains the same model twice from the same seed, plainly and with every step
inside `gradmagic.watch()`, and writes what it saw to `<out>/rank<N>.json`: the rows,
the step table, the findings, and whether the parameters match bit for bit.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

import gradmagic
from gradmagic import stats

STEP = (
    "opt.zero_grad()\n"
    "loss = ((model(x) - y) ** 2).mean()\n"
    "loss.backward()\n"
    "clip_grad_norm_(model.parameters(), 0.5)\n"
    "opt.step()\n"
)
NO_SYNC = "loss = ((model(x) - y) ** 2).mean()\nloss.backward()\n"
LEAF = "loss = (w * w).sum()\nloss.backward()\n"
CLIP = {"clip_grad_norm_": nn.utils.clip_grad_norm_}


def build(mesh):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def summary(value):
    if isinstance(value, stats.TensorSummary):
        return {
            "numel": value.numel,
            "shape": value.shape,
            "norm": value.norm,
            "text": value.text(),
        }
    if isinstance(value, torch.Tensor):
        return {"values": value.tolist()}
    return None if value is None else str(value)


def report_facts(rep, model):
    local = {}
    for name, p in model.named_parameters(prefix="model"):
        if p.grad is not None:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            local[name] = float(g.double().norm())
    return {
        "rows": [[r.name, r.status] for r in rep.rows],
        "after": {r.name: summary(r.after) for r in rep.rows},
        "steps": [
            [p.name, summary(p.grad), summary(p.before), summary(p.after)]
            for s in rep.steps
            for p in s.params
        ],
        "findings": [[f.kind, f.message] for f in rep.findings],
        "then": {r.name: [c.what for c in r.then] for r in rep.rows},
        "errors": rep.errors,
        "text": repr(rep),
        "html": rep._repr_html_(),
        "dot": rep.graph.source,
        "local_norms": local,
    }


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    results: dict = {"rank": rank, "world": world, "reports": []}

    plain, plain_opt = build(mesh)
    watched, watched_opt = build(mesh)
    for step in range(2):
        torch.manual_seed(100 + 10 * step + rank)
        x, y = torch.randn(4, 8), torch.randn(4, 4)
        exec(STEP, {"model": plain, "opt": plain_opt, "x": x, "y": y, **CLIP})
        ns = {"model": watched, "opt": watched_opt, "x": x, "y": y, **CLIP}
        with gradmagic.watch(ns, source=STEP, plot=True) as rec:
            exec(STEP, ns)
        results["reports"].append(report_facts(rec.report(), watched))
    results["identical"] = all(
        torch.equal(a.to_local(), b.to_local())
        for a, b in zip(plain.parameters(), watched.parameters())
    )

    # Gradient sync off: FSDP keeps each gradient on the unsharded parameter.
    watched.set_requires_gradient_sync(False)
    ns = {"model": watched, "opt": watched_opt, "x": x, "y": y}
    watched_opt.zero_grad()
    with gradmagic.watch(ns, source=NO_SYNC) as rec:
        exec(NO_SYNC, ns)
    results["no_sync"] = report_facts(rec.report(), watched)
    watched.set_requires_gradient_sync(True)

    # A DTensor as the user's own leaf.
    w = distribute_tensor(torch.arange(8.0), mesh, [Shard(0)]).requires_grad_()
    ns = {"w": w}
    with gradmagic.watch(ns, source=LEAF) as rec:
        exec(LEAF, ns)
    results["leaf"] = report_facts(rec.report(), nn.Module())
    results["leaf_grad"] = w.grad.to_local().tolist()

    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump(results, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
