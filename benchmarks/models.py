"""Model builders shared by the benchmarks: plain torch.nn, no torchvision.

Each `make_*` returns a `Workload`: the model, its optimizer, one batch, and a
`step()` that does forward + backward + optimizer step the way a notebook cell
would (`opt.zero_grad()` first, so every watched step sees fresh gradients).
Sizes are arguments so that the smoke test can build tiny versions of the same
code paths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class Workload:
    """A model with everything one training step needs."""

    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    inputs: torch.Tensor
    targets: torch.Tensor
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    description: str = ""
    # What the namespace of a notebook would hold: names gradmagic resolves.
    extra: dict[str, Any] = field(default_factory=dict)

    def step(self) -> torch.Tensor:
        self.opt.zero_grad()
        loss = self.loss_fn(self.model(self.inputs), self.targets)
        loss.backward()
        self.opt.step()
        return loss

    def namespace(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "opt": self.opt,
            "x": self.inputs,
            "y": self.targets,
            **self.extra,
        }

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


# --- (a) tiny MLP -------------------------------------------------------------


def make_mlp(width: int = 8, batch: int = 4, seed: int = 0) -> Workload:
    """A seed-sized MLP (4 -> width -> 1): where gradmagic's fixed costs show."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(batch, 4), torch.randn(batch, 1)
    return Workload(
        "tiny MLP",
        model,
        opt,
        x,
        y,
        F.mse_loss,
        f"Linear(4,{width})-ReLU-Linear({width},1), batch {batch}, SGD",
    )


# --- (b) ResNet-18 ------------------------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet-18 layout: 11,689,512 parameters at width 64, 1000 classes."""

    def __init__(
        self, layers: tuple[int, ...] = (2, 2, 2, 2), width: int = 64, num_classes: int = 1000
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = []
        cin = width
        for i, n in enumerate(layers):
            cout = width * 2**i
            blocks = [BasicBlock(cin, cout, 1 if i == 0 else 2)]
            blocks += [BasicBlock(cout, cout) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = (stages + [nn.Identity()] * 4)[:4]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def make_resnet(
    batch: int = 8,
    image: int = 112,
    width: int = 64,
    layers: tuple[int, ...] = (2, 2, 2, 2),
    num_classes: int = 1000,
    seed: int = 0,
) -> Workload:
    torch.manual_seed(seed)
    model = ResNet(layers, width, num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, image, image)
    y = torch.randint(0, num_classes, (batch,))
    return Workload(
        "ResNet-18",
        model,
        opt,
        x,
        y,
        F.cross_entropy,
        f"ResNet-18 layout (width {width}), batch {batch}×3×{image}×{image}, SGD+momentum",
    )


# --- (c) transformer language model ---------------------------------------------


class TransformerLM(nn.Module):
    """A GPT-style decoder: token + position embeddings, pre-norm blocks, tied head."""

    def __init__(
        self,
        vocab: int = 16384,
        d_model: int = 512,
        n_layers: int = 6,
        n_heads: int = 8,
        d_ff: int = 2048,
        max_len: int = 256,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, d_ff, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.head(self.norm(h))


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make_transformer(
    batch: int = 4,
    seq: int = 64,
    vocab: int = 16384,
    d_model: int = 512,
    n_layers: int = 6,
    n_heads: int = 8,
    d_ff: int = 2048,
    seed: int = 0,
) -> Workload:
    torch.manual_seed(seed)
    model = TransformerLM(vocab, d_model, n_layers, n_heads, d_ff, max_len=max(seq, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    idx = torch.randint(0, vocab, (batch, seq + 1))
    return Workload(
        "Transformer LM",
        model,
        opt,
        idx[:, :-1].contiguous(),
        idx[:, 1:].contiguous(),
        _lm_loss,
        f"{n_layers}-layer decoder d={d_model} ff={d_ff} vocab={vocab} (tied), "
        f"batch {batch}×{seq} tokens, AdamW",
    )


# --- (d) 2,000 parameter tensors -----------------------------------------------


class ResidualStack(nn.Module):
    """`depth` residual blocks `x + tanh(Linear(x))`: two parameter tensors each."""

    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)


def make_many(depth: int = 999, width: int = 32, batch: int = 16, seed: int = 0) -> Workload:
    """A model of many small parameter tensors (2,000 by default): where the report's
    per-row costs show."""
    torch.manual_seed(seed)
    model = ResidualStack(depth, width)
    for block in model.blocks:  # small residual updates keep 1,000 layers finite
        nn.init.normal_(block.weight, std=0.02)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, width), torch.randn(batch, 1)
    return Workload(
        "2,000 tensors",
        model,
        opt,
        x,
        y,
        F.mse_loss,
        f"{depth} residual blocks x + tanh(Linear({width},{width})(x)) and a head: "
        f"{2 * depth + 2:,} parameter tensors, batch {batch}, Adam",
    )


BUILDERS = {
    "mlp": make_mlp,
    "resnet": make_resnet,
    "transformer": make_transformer,
    "many": make_many,
}

# Sizes for the smoke test: the same code paths in milliseconds.
TINY = {
    "mlp": {},
    "resnet": {"batch": 2, "image": 32, "width": 4, "layers": (1, 1), "num_classes": 10},
    "transformer": {
        "batch": 2,
        "seq": 8,
        "vocab": 64,
        "d_model": 16,
        "n_layers": 1,
        "n_heads": 2,
        "d_ff": 32,
    },
    "many": {"depth": 9, "width": 4, "batch": 2},
}
