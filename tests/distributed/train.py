"""Small DistributedDataParallel training runs for tests/test_distributed.py.

Run under `python -m torch.distributed.run --nproc-per-node 2 train.py OUT SCENARIO...`.
Each scenario trains the same model from the same seed twice on every rank, plainly
and under `gradmagic.watch()`, and writes to OUT/rank{r}.json what both computed
(gradients, parameters, the next random numbers), what the report said (headline,
rows, findings, the saved page), and this rank's own gradient without DDP, from
which the test works out what DDP's all-reduce must give.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import gradmagic
from gradmagic import _engine

CHECKED = {"check", "desync", "ignored", "branch"}  # scenarios run with check_ranks=True


class Net(nn.Module):
    def __init__(self, branch: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 3)
        self.fc2 = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.ones(2))
        self.branch = branch  # rank 0 only multiplies by `scale`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(torch.tanh(self.fc1(x)))
        if self.branch and torch.distributed.get_rank() != 0:
            return out
        return out * self.scale


def sum_hook(state, bucket):  # noqa: ANN001 - DDP checks real annotations, not strings
    """A user's communication hook that sums the ranks' gradients (no division)."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
    return torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro: bool) -> None:
    if not micro:
        nn.functional.mse_loss(model(x), y).backward()
        return
    for i in range(4):  # four micro-batches: the first three without the all-reduce
        xb, yb = x[2 * i : 2 * i + 2], y[2 * i : 2 * i + 2]
        sync = model.no_sync() if i < 3 and isinstance(model, DDP) else contextlib.nullcontext()
        with sync:
            (nn.functional.mse_loss(model(xb), yb) / 4).backward()


def local_gradient(mode: str, rank: int) -> dict[str, list]:
    """This rank's own gradient, without DDP."""
    torch.manual_seed(0)
    net = Net(branch=mode == "branch")
    x, y = data(rank)
    backward(net, x, y, mode == "nosync")
    return {name: None if p.grad is None else p.grad.tolist() for name, p in net.named_parameters()}


def run(mode: str, rank: int, watched: bool) -> dict:
    torch.manual_seed(0)
    net = Net(branch=mode == "branch")
    if mode == "ignored":
        # DDP matches `{module path}.{name}`: `fc2.bias` is ignored, while `scale`, a
        # parameter of the model itself, would have to be spelled `.scale` and is reduced.
        DDP._set_params_and_buffers_to_ignore_for_model(net, ["fc2.bias", "scale"])
    model = DDP(net, find_unused_parameters=mode == "branch")
    del net  # the script, like most, knows the model as `model` only
    if mode == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    if mode == "sum":
        model.register_comm_hook(None, sum_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data(rank)
    out: dict = {"grads": [], "reports": []}
    for _ in range(2):  # two steps, each a watched block of its own
        block = (
            gradmagic.watch(check_ranks=mode in CHECKED, rank_timeout=60)
            if watched
            else contextlib.nullcontext()
        )
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), block as rec:
            opt.zero_grad()
            backward(model, x, y, mode == "nosync")
            if mode == "desync" and rank == 1:
                with torch.no_grad():  # after the all-reduce, on this rank only
                    model.module.fc2.bias.grad.add_(0.5)
            opt.step()
        out["grads"].append({n: p.grad.tolist() for n, p in model.module.named_parameters()})
        if watched:
            assert not _engine.is_patched()
            rep = rec.report()
            saved = rep.save(os.path.join(OUT, f"{mode}.html"))
            out["reports"].append(
                {
                    "printed": printed.getvalue(),
                    "headline": rep.headline(),
                    "text": str(rep).splitlines()[0],
                    "saved": os.path.basename(saved),
                    "saved_exists": os.path.exists(saved),
                    "rows": [[r.name, r.status, _list(r.after), _list(r.added)] for r in rep.rows],
                    "findings": [
                        [f.kind, f.severity, f.message, list(f.tensors)] for f in rep.findings
                    ],
                    "errors": rep.errors,
                    "html_has_rank": f"rank {rank}/2" in rep._repr_html_(),
                }
            )
    out["params"] = {n: p.detach().tolist() for n, p in model.module.named_parameters()}
    out["random"] = torch.rand(4).tolist()  # the global generator after the run
    return out


def _list(value: object) -> object:
    return value.tolist() if isinstance(value, torch.Tensor) else value


def magic(rank: int) -> dict:
    """`%%grad --check-ranks -o rep` in an IPython shell on each rank."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext gradmagic")
    torch.manual_seed(0)
    x, y = data(rank)
    shell.user_ns.update({"model": DDP(Net()), "x": x, "y": y, "nn": nn})
    with capture_output() as captured:
        result = shell.run_cell(
            "%%grad --check-ranks -o rep\nnn.functional.mse_loss(model(x), y).backward()"
        )
    rep = shell.user_ns["rep"]
    return {
        "ok": result.success,
        "stdout": captured.stdout,
        "shown": [o.data.get("text/plain", "") for o in captured.outputs],
        "headline": rep.headline(),
        "kinds": [f.kind for f in rep.findings],
    }


def dispatch(rank: int) -> dict:
    """The ops a user's dispatch mode sees in a DDP step, plainly and watched with the check."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    seen = {}
    for watched in (False, True):
        torch.manual_seed(0)
        model = DDP(Net())
        x, y = data(rank)
        log = Log()
        block = gradmagic.watch(check_ranks=True) if watched else contextlib.nullcontext()
        with log, block:
            nn.functional.mse_loss(model(x), y).backward()
        seen["watched" if watched else "plain"] = log.ops
    return seen


def main() -> None:
    global OUT
    OUT = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results: dict = {}
    for mode in sys.argv[2:]:
        if mode == "magic":
            results[mode] = magic(rank)
        elif mode == "dispatch":
            results[mode] = dispatch(rank)
        elif mode == "late":
            # Both ranks check the first block; only rank 1 the second, and gives up.
            results[mode] = []
            w = nn.Parameter(torch.ones(2))
            for i in range(2):
                w.grad = None
                with gradmagic.watch(
                    {"w": w}, check_ranks=i == 0 or rank == 1, rank_timeout=3
                ) as rec:
                    (w * 2).sum().backward()
                found = rec.report().findings
                results[mode].append([[f.kind, f.severity, f.message] for f in found])
        elif mode == "timeout":
            # Only rank 1 asks for the check: it must give up after its timeout.
            block = gradmagic.watch(check_ranks=rank == 1, rank_timeout=3)
            with block as rec:
                nn.functional.mse_loss(Net()(torch.ones(1, 4)), torch.zeros(1, 2)).backward()
            results[mode] = [[f.kind, f.severity, f.message] for f in rec.report().findings]
        else:
            results[mode] = {
                "plain": run(mode, rank, False),
                "watched": run(mode, rank, True),
                "local": local_gradient(mode, rank),
            }
    with open(os.path.join(OUT, f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh)
    dist.destroy_process_group()


OUT = ""

if __name__ == "__main__":
    main()
