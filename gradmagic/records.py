"""The facts of a watched block, as plain data: no behaviour, no live tensor.

Capture fills these as things happen; findings and the report read them and
nothing else. A *value* is what a gradient held at one moment, by content: None
(no `.grad`), an exact copy (small tensors), or a `stats.TensorSummary`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .graph.data import GraphSnapshot
from .options import Options
from .trajectory import Trajectory


@dataclass(slots=True)
class Change:
    """`.grad` changed between two readings with no backward in between."""

    what: str  # "set to None", "zeroed", "scaled", "changed"
    by: str  # what did it, when known: "`clip_grad_norm_(max_norm=1.0)`"; "" otherwise
    before: Any
    after: Any
    factor: float | None = None  # after = factor × before (copies), or the ratio of norms
    when: str = ""  # "before `opt.step()`", "before backward 3", "by the end of the block"


@dataclass(slots=True)
class LeafRecord:
    """One leaf tensor a backward reached (or that should have got a gradient)."""

    key: int
    ref: Any  # weakref.ref to the leaf, never the tensor
    shape: tuple[int, ...] | None
    dtype: str
    device: str
    numel: int
    name: str = ""
    names: list[str] = field(default_factory=list)
    order: int = 0
    consumer: str | None = None  # the first op that used it, for a leaf nobody named
    # What `.grad` held, read when it happened.
    before: Any = None  # before the block's first backward that reached it
    after: Any = None  # right after the last backward that reached it
    added: Any = None  # what the backwards since it was last empty (or since `before`) added
    added_known: bool = True  # False where a change between backwards hides it
    used: Any = None  # what the last optimizer step used, when `stepped`
    stepped: bool = False  # a step came after the last backward and used its gradient
    end: Any = None  # when the block ended, where read (`end_read`)
    # Read at the end: every None and every small gradient. A large one is not read again
    # (that is a pass over it): `latest` is then the last value read.
    end_read: bool = False
    latest: Any = None
    later: list[Change] = field(default_factory=list)  # changes after the last backward
    # How it got there.
    backwards: int = 0  # backwards that added to it
    failed: int = 0  # backwards that reached it and raised
    grad_calls: int = 0  # `torch.autograd.grad` calls with it as an input
    summed: int = 0  # backwards summed into `after` since it was last empty
    summed_structures: int = 0  # distinct graphs among them
    steps: int = 0  # optimizer steps that used its gradient
    stale_steps: int = 0  # steps that used a gradient an earlier step had already used
    cycles: list[int] = field(default_factory=list)  # backwards summed into each step's gradient
    emptied: int = 0  # times it was set to None or zeroed between backwards
    trajectory: Trajectory = field(default_factory=Trajectory)  # ‖.grad‖ after each backward
    stale_start: bool = False  # `before` held a gradient that `after` still adds to
    before_origin: str = ""  # "watched run", "changed", "unwatched": where `before` came from
    runs_before: int = 0  # cell runs that had added to `before`
    expected: bool = False  # should have got a gradient and did not
    in_graph: bool = False  # some backward's graph reached it (it may not have been asked for)
    nested_only: bool = False  # first reached by a backward inside a backward (a checkpoint's)
    internal: bool = False  # a leaf torch made for itself and dropped (not a row)
    status: str = ""
    runs: int = 0
    owner: str | None = None  # variable of the module holding it (`model`)
    layer: str | None = None  # the module path of its own layer (`model.0`)
    optimizer: str | None = None  # variable of an optimizer holding it


@dataclass(slots=True)
class BackwardRecord:
    """One call into the autograd engine made while watching."""

    kind: str  # "backward" or "grad"
    via: str  # the torch function the user's code called: `Tensor.backward`, `gradcheck`
    roots: list[str]
    gradient: list[Any] | None  # values of the `gradient=` argument
    retain_graph: bool
    create_graph: bool
    inputs: list[str] | None
    leaf_keys: list[int] = field(default_factory=list)
    error: str | None = None
    results: list[Any] | None = None  # what torch.autograd.grad returned
    # A repeat of a graph recorded earlier in the block is folded (no nodes) and points to
    # it through `graph.repeat_of`.
    graph: GraphSnapshot | None = None
    nested: int = 0  # backwards run inside it (a reentrant checkpoint), merged in
    loss_scale: float | None = None  # a GradScaler's scale, when it scaled what this started from
    _root_refs: list[Any] = field(default_factory=list, repr=False)
    _input_refs: list[Any] = field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        extra = f", gradient={self.gradient}" if self.gradient is not None else ""
        return f"BackwardRecord(kind={self.kind!r}, roots={self.roots}{extra})"


@dataclass(slots=True)
class EditEvent:
    """A call that changes gradients between backwards: a clip, a GradScaler's work."""

    what: str  # "clip_norm", "clip_value", "scale", "unscale", "scaler_step"
    text: str  # how the user spelled it, for sentences: "`clip_grad_norm_(max_norm=1.0)`"
    factor: float | None = None  # what it multiplies gradients by, when it scales them
    skipped: bool = False  # scaler_step: NaN/Inf were found and the optimizer step skipped
    optimizer: str = ""


@dataclass
class ParamStep:
    """One parameter across an optimizer's steps in a block.

    `grad` is what the last step used; `before` the parameter before the first
    step; `after` the parameter when the block ended; `change` is `after - before`
    (small tensors) or the norm of that difference (large ones within the copy
    budget). Each is a value: a copy or a `TensorSummary`.
    """

    name: str
    shape: tuple[int, ...] | None
    grad: Any
    before: Any
    after: Any
    change: Any
    steps: int
    moved_after_step: bool = False  # something wrote to it after its last step
    part: str = ""  # a DTensor's: which part of it `before`/`after` measure ("this rank's shard")
    ref: Any = field(default=None, repr=False)  # weakref.ref to the parameter
    # A large parameter within the copy budget: its copies before the first step and at
    # the end, until a report summarises them into `before`, `after` and `change`.
    copies: tuple[Any, Any] | None = field(default=None, repr=False)

    def tensor(self) -> Any:
        return self.ref() if self.ref is not None else None


@dataclass
class OptimizerSteps:
    """What one optimizer's `step()` calls did in the block."""

    name: str  # the variable holding it, else its class name
    kind: str  # `SGD`, `Adam`, ...
    hyperparameters: dict[str, Any]
    steps: int
    params: list[ParamStep]
    budget: int  # elements of large parameters copied to measure ‖Δ‖
    skipped: int = 0  # steps a GradScaler skipped (NaN/Inf in the gradients)

    @property
    def title(self) -> str:
        """`opt = SGD(lr=0.001)`."""
        hyper = ", ".join(f"{k}={_number(v)}" for k, v in self.hyperparameters.items())
        call = f"{self.kind}({hyper})"
        return call if self.name == self.kind else f"{self.name} = {call}"


def _number(value: Any) -> str:
    """A hyperparameter as set, not as float arithmetic left it: `0.49`, `(0.9, 0.999)`."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_number(v) for v in value) + ")"
    return str(value)


@dataclass(slots=True)
class ModuleFact:
    """A module of the namespace whose parameters have rows."""

    name: str  # its variable
    ran: bool  # a forward of it ran in the block with gradients on
    saturating: int  # sigmoid-like activations among its submodules
    leaf_keys: list[int] = field(default_factory=list)  # its parameters' rows


@dataclass(slots=True)
class DDPFact:
    """A `DistributedDataParallel` whose forward ran in the block with gradients on."""

    name: str  # its variable (`model`), else "" when the namespace does not hold it
    world_size: int  # ranks of its process group
    synced: int  # forwards whose backward DDP all-reduces
    unsynced: int  # forwards under `no_sync()`: their gradients stayed on this rank
    hook: str = ""  # its communication hook's name, "" for DDP's own all-reduce
    hook_known: str = ""  # what the hook does, for the hooks torch ships ("" for others)
    leaf_keys: list[int] = field(default_factory=list)  # rows of its synchronised parameters
    ignored_keys: list[int] = field(default_factory=list)  # rows of parameters DDP ignores
    forward_before: bool = False  # its forward ran before the block, only its backward in it


@dataclass(slots=True)
class RankGradient:
    """One parameter's `.grad` on one rank when the block ended, as a fingerprint."""

    shape: tuple[int, ...] | None  # None: no `.grad`
    dtype: str
    checksum: int  # the sum of its bit patterns as integers: equal content, equal sum
    norm: float


@dataclass
class RankCheck:
    """The cross-rank consistency check (`check_ranks=True`).

    `error` says why it did not run; else `grads[rank][name]` is each parameter's
    fingerprint on each rank, `skipped` the parameters it could not fingerprint (a
    sparse or sharded gradient), by name and why.
    """

    world_size: int = 0
    error: str = ""
    timed_out: bool = False
    grads: list[dict[str, RankGradient]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class CustomCheck:
    """`torch.autograd.gradcheck` on one custom `autograd.Function` (`check=True`).

    `status`: "ok", "mismatch" (the backward disagrees with finite differences, or
    raised) or "not checked" (`reason` says why). For a mismatch located element by
    element: the tensor `input` that disagrees most, at `element` of it and element
    `output_element` of the flattened outputs, by `gap` (`analytical` from the
    backward, `numerical` from finite differences).
    """

    function: str  # the Function's qualified name
    shapes: tuple[tuple[int, ...] | None, ...]  # of its tensor inputs
    leaf_keys: tuple[int | None, ...] = ()  # the leaf row fed straight into each input
    status: str = ""
    reason: str = ""
    detail: str = ""  # gradcheck's first line, or what the backward raised
    fast: bool = False  # gradcheck's fast mode (inputs too large for a full Jacobian)
    input: int | None = None
    element: tuple[int, ...] = ()
    output_element: int = 0
    gap: float | None = None
    analytical: float | None = None
    numerical: float | None = None
    seconds: float = 0.0


@dataclass
class BlockRecord:
    """Everything a watched block recorded: what findings and the report read."""

    run: int
    source: str | None
    options: Options
    grad_mode: str = "enabled"  # or "no_grad", "inference_mode" when the block began
    leaves: list[LeafRecord] = field(default_factory=list)
    backwards: list[BackwardRecord] = field(default_factory=list)
    steps: list[OptimizerSteps] = field(default_factory=list)
    events: list[EditEvent] = field(default_factory=list)
    modules: list[ModuleFact] = field(default_factory=list)
    nonleaf_grad_reads: list[str] = field(default_factory=list)
    unobserved: list[str] = field(default_factory=list)  # engine calls left alone, and why
    # Backward ops of regions torch.compile compiled (one op each, opaque inside), and the
    # compiled modules and functions the block ran or names: (variable, what it compiled).
    compiled_ops: int = 0
    compiled: list[tuple[str, str]] = field(default_factory=list)
    # torch.func transforms the code calls (`torch.func.grad`): their gradients are returned.
    transforms: list[str] = field(default_factory=list)
    internal_errors: list[str] = field(default_factory=list)
    # torch.distributed, when initialised: this process's rank and the world size.
    rank: int | None = None
    world_size: int = 1
    ddp: list[DDPFact] = field(default_factory=list)
    rank_check: RankCheck | None = None
    custom_checks: list[CustomCheck] | None = None  # `check=True`: one per Function and shapes


def rows(block: BlockRecord) -> list[LeafRecord]:
    """The table's rows, in table order, filtered by `only`."""
    shown = [
        r for r in block.leaves if (r.backwards or r.grad_calls or r.expected) and not r.internal
    ]
    shown.sort(key=lambda r: r.order)
    only = block.options.only
    if only is not None:
        shown = [r for r in shown if only.search(r.name)]
    return shown
