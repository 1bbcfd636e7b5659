"""The torch facts gradmagic rests on. If a torch upgrade moves them, these fail first."""

from __future__ import annotations

import inspect
import threading
import weakref

import pytest
import torch
from torch.utils.weak import WeakIdKeyDictionary

import gradmagic
from gradmagic import _engine


def test_engine_entry_is_bound_under_both_names():
    assert torch.autograd._engine_run_backward is torch.autograd.graph._engine_run_backward
    params = list(inspect.signature(torch.autograd.graph._engine_run_backward).parameters)
    assert params[0] == "t_outputs"
    assert "grad_tensors" in torch.autograd.backward.__code__.co_varnames
    assert "grad_outputs" in torch.autograd.grad.__code__.co_varnames


def test_backward_and_grad_both_pass_through_the_wrapper():
    calls = []
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    with gradmagic.watch({}) as rec:
        original_handle = rec.handle

        def spy(original, args, kwargs, frame):
            calls.append(_engine.parse_call(args, kwargs).kind)
            return original_handle(original, args, kwargs, frame)

        rec.handle = spy
        (x * 2).sum().backward()
        torch.autograd.backward([(x * 3).sum()])
        torch.autograd.grad((x * 4).sum(), x)
    assert calls == ["backward", "backward", "grad"]
    assert torch.equal(x.grad, torch.tensor([5.0, 5.0]))


def test_accumulate_grad_exposes_its_leaf_and_metadata():
    x = torch.ones(3, requires_grad=True)
    y = (x * 2).sum()
    node = y.grad_fn.next_functions[0][0].next_functions[0][0]
    assert type(node).__name__ == "AccumulateGrad"
    assert node.variable is x
    assert tuple(y.grad_fn.next_functions[0][0]._input_metadata[0].shape) == (3,)
    from gradmagic.graph import snapshot

    snap, _ = snapshot([y], leaf_key=lambda leaf: 7 if leaf is x else -1)
    assert [n.leaf_key for n in snap.nodes if n.kind == "leaf"] == [7]


def test_saved_tensors_are_freed_by_a_backward_without_retain_graph():
    x = torch.ones(2, requires_grad=True)
    y = x * x
    node = y.grad_fn
    assert torch.equal(node._saved_self, x)
    y.sum().backward()
    with pytest.raises(RuntimeError):
        _ = node._saved_self


def test_accumulation_is_in_place_and_bumps_the_version():
    x = torch.ones(2, requires_grad=True)
    (x * 2).sum().backward()
    grad, version = x.grad, x.grad._version
    (x * 2).sum().backward()
    assert x.grad is grad and x.grad._version > version
    opt = torch.optim.SGD([x], lr=0.1)
    opt.zero_grad()
    assert x.grad is None
    (x * 2).sum().backward()
    grad, version = x.grad, x.grad._version
    opt.zero_grad(set_to_none=False)
    assert x.grad is grad and x.grad._version > version and not x.grad.any()


def test_tensors_support_weak_id_dictionaries():
    d = WeakIdKeyDictionary()
    t = torch.ones(2)
    d[t] = 1
    ref = weakref.ref(t)
    del t
    assert ref() is None and len(d) == 0


def test_nested_backward_inside_a_hook_is_left_alone():
    x = torch.ones(2, requires_grad=True)
    inner = torch.ones(2, requires_grad=True)

    def hook(grad):
        with torch.enable_grad():
            (inner * 7).sum().backward()  # a re-entrant call: not recorded

    y = x * 2
    y.register_hook(hook)
    with gradmagic.watch({"x": x, "inner": inner}) as rec:
        y.sum().backward()
    assert [r.kind for r in rec.records] == ["backward"]
    assert torch.equal(inner.grad, torch.tensor([7.0, 7.0]))


def test_backward_in_another_thread_is_left_alone():
    x = torch.ones(2, requires_grad=True)
    other = torch.ones(2, requires_grad=True)
    errors = []

    def work():
        try:
            (other * 3).sum().backward()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with gradmagic.watch({"x": x}) as rec:
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        (x * 2).sum().backward()
    assert not errors
    assert torch.equal(other.grad, torch.tensor([3.0, 3.0]))
    assert len(rec.records) == 1


def test_functorch_transforms_are_left_alone():
    x = torch.tensor([1.0, 2.0])
    with gradmagic.watch({}) as rec:
        g = torch.func.grad(lambda t: (t**2).sum())(x)
    assert torch.equal(g, torch.tensor([2.0, 4.0]))
    assert rec.records == []


def test_module_tree_reads_what_named_modules_and_named_parameters_give():
    from torch import nn
    from torch.nn.utils import parametrize

    class Symmetric(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w.triu() + w.triu(1).T

    class Renamed(nn.Linear):
        def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
            for name, p in super().named_parameters(prefix, recurse, remove_duplicate):
                yield name + "_renamed", p

    model = nn.Sequential(
        nn.Linear(3, 3),
        nn.ModuleDict({"a b": nn.Linear(2, 2), "c": nn.ModuleList([nn.Conv2d(1, 1, 1)])}),
    )
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    model[1]["a b"].register_parameter("unset", None)
    model.tied = model[0]  # the same module twice: listed under both paths
    for module, prefix in [(model, "model"), (model, ""), (Renamed(2, 2), "r")]:
        modules, params = _engine.module_tree(module, prefix)
        assert modules == list(module.named_modules(prefix=prefix, remove_duplicate=False))
        expected = module.named_parameters(prefix=prefix, remove_duplicate=False)
        assert [(n, id(p)) for n, p in params] == [(n, id(p)) for n, p in expected]
    names = [n for n, _ in _engine.module_tree(model, "model")[1]]
    assert names[:2] == ["model.0.bias", "model.0.parametrizations.weight.original"]
    assert "model.tied.bias" in names
    assert [n for n, _ in _engine.module_tree(Renamed(2, 2), "r")[1]] == [
        "r.weight_renamed",
        "r.bias_renamed",
    ]


def test_fsdp2_internals_are_where_gradmagic_reads_them():
    """`_engine.fsdp_unsharded` reads FSDP2's private state: it must still be there."""
    import inspect
    import weakref

    from torch.distributed import _composable_state
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group, _fsdp_state

    assert isinstance(_composable_state._module_state_mapping, weakref.WeakKeyDictionary)
    assert "_unsharded_param" in _fsdp_param.FSDPParam.__annotations__
    init = inspect.getsource(_fsdp_param.FSDPParam)
    assert "self.sharded_param = nn.Parameter(" in init
    assert "self._unsharded_param = nn.Parameter(" in init
    group = inspect.getsource(_fsdp_param_group.FSDPParamGroup.__init__)
    assert "self.fsdp_params = [" in group and "self.reduce_grads: bool = True" in group
    assert "self._fsdp_param_groups: list[FSDPParamGroup] = []" in inspect.getsource(
        _fsdp_state.FSDPState.__init__
    )
    assert _engine.fsdp_unsharded() == {}  # no fully_shard module alive in this process


def test_default_saved_tensor_hooks_can_be_taken_off_and_put_back():
    pack, unpack = (lambda t: t), (lambda t: t)
    top = torch._C._autograd._top_saved_tensors_default_hooks
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        assert top(False) == (pack, unpack)
        with _engine.without_saved_tensor_hooks():
            assert top(False) is None
        assert top(False) == (pack, unpack)
    assert top(False) is None


def test_a_custom_function_node_names_its_class_and_only_its_tensor_inputs():
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, k):
            return x * k

        @staticmethod
        def backward(ctx, g):
            return g, None

    x = torch.ones(2, requires_grad=True)
    node = Scale.apply(x, 2.0).grad_fn
    assert _engine.custom_function_class(node) is Scale
    assert len(node.next_functions) == 1  # the number 2.0 has no edge
    leaf = node.next_functions[0][0]
    assert [tuple(s) for s in _engine.input_sizes(leaf)] == [(2,)]
    assert _engine.input_devices(leaf) == ["cpu"]
