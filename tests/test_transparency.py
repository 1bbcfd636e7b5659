"""gradmagic never changes what PyTorch computes: same gradients, updates, results, errors."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradmagic
from gradmagic import _engine


def _run(step, watching: bool, **options):
    torch.manual_seed(0)
    if not watching:
        return step()
    with gradmagic.watch({}, **options) as rec:
        out = step()
    rec.report()._repr_html_()  # building and drawing the report must not disturb anything
    return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if a.device.type == "meta":
            return a.shape == b.shape and a.dtype == b.dtype
        if a.is_sparse:
            return torch.equal(a.coalesce().to_dense(), b.coalesce().to_dense())
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _mlp_step():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    grads = []
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return loss.detach(), grads, [p.detach().clone() for p in model.parameters()]


def _cnn_step():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    return [p.detach().clone() for p in model.parameters()], [p.grad for p in model.parameters()]


def _transformer_step():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    out = model(torch.randn(2, 5, 16))
    out.pow(2).mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def _double_backward():
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    (g,) = torch.autograd.grad((x**3).sum(), x, create_graph=True)
    g.sum().backward()
    return g.detach(), x.grad.clone()  # 3x^2 and 6x


def _lbfgs():
    w = torch.tensor([3.0, -2.0], requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=0.5, max_iter=5)

    def closure():
        opt.zero_grad()
        loss = ((w - torch.tensor([1.0, 1.0])) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().clone()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint(use_reentrant):
    def step():
        lin = nn.Linear(4, 4)
        x = torch.randn(3, 4, requires_grad=True)
        y = checkpoint(lambda t: torch.tanh(lin(t)), x, use_reentrant=use_reentrant)
        y.sum().backward()
        return [x.grad.clone(), lin.weight.grad.clone()]

    assert _same(_run(step, False), _run(step, True))


class Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x**2


def _custom_function():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    Cube.apply(x).sum().backward()
    return x.grad.clone()  # [3, 12]


def _user_hooks():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = x * 2
    y.register_hook(lambda g: g * 10)
    y.retain_grad()
    y.sum().backward()
    return x.grad.clone(), y.grad.clone()


def _sparse_embedding():
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2, 1])).sum().backward()
    return emb.weight.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.half, torch.complex64])
def test_dtypes(dtype):
    def step():
        w = torch.linspace(-1, 1, 40).to(dtype).requires_grad_()
        loss = (w * w).sum() if not dtype.is_complex else (w * w.conj()).real.sum()
        loss.backward()
        return w.grad.clone()

    assert _same(_run(step, False), _run(step, True))


def _meta():
    w = torch.empty(4, 4, device="meta", requires_grad=True)
    (w * 2).sum().backward()
    return w.grad


@pytest.mark.parametrize(
    "step",
    [
        _mlp_step,
        _cnn_step,
        _transformer_step,
        _double_backward,
        _lbfgs,
        _custom_function,
        _user_hooks,
        _sparse_embedding,
        _meta,
    ],
)
@pytest.mark.parametrize(
    "options", [{"copies": False}, {"copies": True}, {"steps": True, "check": True}]
)
def test_bit_identical(step, options):
    assert _same(_run(step, False), _run(step, True, **options))


def test_known_values_survive_watching():
    g, second = _run(_double_backward, True)
    assert torch.equal(g, torch.tensor([3.0, 12.0, 27.0]))
    assert torch.equal(second, torch.tensor([6.0, 12.0, 18.0]))
    assert torch.equal(_run(_custom_function, True), torch.tensor([3.0, 12.0]))
    x_grad, y_grad = _run(_user_hooks, True)
    assert torch.equal(x_grad, torch.tensor([20.0, 20.0]))


@pytest.mark.parametrize(
    "cell, error, reaches_engine",
    [
        ("(x * 2).backward()", "grad can be implicitly created only for scalar outputs", False),
        ("torch.ones(2).sum().backward()", "does not require grad", True),
        ("with torch.no_grad():\n    (x * 2).sum().backward()", "does not require grad", True),
        (
            "with torch.inference_mode():\n    (x * 2).sum().backward()",
            "does not require grad",
            True,
        ),
    ],
)
def test_errors_are_identical(cell, error, reaches_engine):
    def attempt():
        x = torch.ones(2, requires_grad=True)
        try:
            exec(cell, {"torch": torch, "x": x})
        except Exception as exc:  # noqa: BLE001 - the error is the result
            return type(exc), str(exc)
        return None

    plain = attempt()
    with gradmagic.watch({}) as rec:
        watched = attempt()
    assert plain == watched and error in plain[1]
    assert not _engine.is_patched()
    # PyTorch raises some errors before the engine is entered: nothing to record then.
    assert [bool(r.error) for r in rec.records] == ([True] if reaches_engine else [])


def test_torch_compile_aot_eager_is_identical():
    def step():
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        compiled = torch.compile(model, backend="aot_eager")
        compiled(torch.randn(5, 4)).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    assert _same(_run(step, False), _run(step, True))


def test_no_tensor_stays_alive_after_the_block():
    # Run like a notebook cell: module-level code in a namespace dict. (Inside a
    # function, CPython 3.11 keeps a snapshot of the locals that any read of
    # `frame.f_locals`, gradmagic's naming or a debugger's, leaves behind until
    # the function returns.)
    ns = {"torch": torch, "nn": nn, "gradmagic": gradmagic, "weakref": weakref}
    code = (
        "model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))\n"
        "refs = [weakref.ref(p) for p in model.parameters()]\n"
        "x = torch.randn(4, 8)\n"
        "for _ in range(5):\n"
        "    with gradmagic.watch(globals()) as rec:\n"
        "        hidden = model[1](model[0](x))\n"
        "        refs.append(weakref.ref(hidden))\n"
        "        model[2](hidden).sum().backward()\n"
        "    rec.report()._repr_html_()\n"
        "    del hidden\n"
        "del model, rec\n"
    )
    exec(code, ns)
    gc.collect()
    refs = ns["refs"]
    assert len(refs) == 9
    assert [r for r in refs if r() is not None] == []


@pytest.mark.slow
def test_torch_compile_inductor_is_identical_when_it_compiles_here():
    def step():
        torch._dynamo.reset()
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        compiled = torch.compile(model, backend="inductor")
        compiled(torch.randn(5, 4)).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    try:
        plain = _run(step, False)
    except Exception as exc:  # noqa: BLE001 - no working C++ toolchain for inductor here
        pytest.skip(f"inductor does not compile on this machine: {type(exc).__name__}")
    assert _same(plain, _run(step, True))


def test_torch_compile_under_watch_shows_no_warning_of_gradmagics_making():
    import warnings

    def compiled_step():
        torch._dynamo.reset()
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        torch.compile(model, backend="aot_eager")(torch.randn(5, 4)).sum().backward()

    def messages(watching: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            _run(compiled_step, watching)
        return sorted({str(w.message) for w in seen})

    assert messages(True) == messages(False)
