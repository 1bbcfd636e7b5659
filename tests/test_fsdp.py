"""FSDP2 (`fully_shard`) and DTensor under `watch()`, on CPU with gloo, in real processes
started by `torch.distributed.run`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import launch

WORKER = Path(__file__).with_name("fsdp_worker.py")
TIMEOUT = 180  # seconds: a hung collective fails the test instead of hanging it

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, ranks: int) -> list[dict]:
    command = launch.torchrun(str(WORKER), str(tmp_path), nproc=ranks)
    code, output, _ = launch.bounded(command, timeout=TIMEOUT, merge_stderr=True)
    assert code == 0, output[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]


PARAMS = ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"]
ELEMENTS = {"model.0.weight": 64, "model.0.bias": 8, "model.2.weight": 32, "model.2.bias": 4}


def _common(result: dict) -> None:
    """What holds on every rank, whatever the world size."""
    assert result["identical"]  # parameters after 2 steps, bit for bit
    for rep in result["reports"]:
        assert rep["rows"] == [[name, "new"] for name in PARAMS]
        assert rep["errors"] == []
        kinds = [kind for kind, _ in rep["findings"]]
        assert kinds == ["optimizer-step", "changed-after-backward"]
        # clip_grad_norm_ scaled every gradient after the backward, and the step used that.
        assert rep["then"] == {name: ["scaled"] for name in PARAMS}
        assert "received none" not in rep["text"] and "leaf #" not in rep["text"]
        assert "leaf #" not in rep["dot"] and "leaf #" not in rep["html"]
        for name in PARAMS:  # the graph's leaves are the parameters, by name
            assert f'label="{name}\\n' in rep["dot"]
        assert [row[0] for row in rep["steps"]] == PARAMS


def test_fsdp2_two_ranks_shows_each_rank_its_shard(tmp_path):
    results = _run(tmp_path, 2)
    for result in results:
        _common(result)
        for rep in result["reports"]:
            for name in PARAMS:
                after = rep["after"][name]
                local = ELEMENTS[name] // 2
                assert after["numel"] == local
                label = f"this rank's shard ({local} of {ELEMENTS[name]} elements): ‖g‖="
                assert after["text"].startswith(label)
            for name, grad, before, end in rep["steps"]:
                local = ELEMENTS[name] // 2
                assert grad["numel"] == local and grad["text"].startswith("this rank's shard (")
                # The norm of this rank's shard of what the step used, as the worker reads it.
                assert abs(grad["norm"] - rep["local_norms"][name]) <= 1e-6 * grad["norm"]
                assert before["numel"] == end["numel"] == local
                assert before["text"].startswith(f"this rank's shard ({local} of ")
            assert "this rank's shard (32 of 64 elements): ‖g‖=" in rep["text"]
            assert "gradient flow, of this rank's shards: RMS |grad| from " in rep["text"]
    # Gradient sync off: each gradient stays whole on the unsharded parameter.
    for result in results:
        no_sync = result["no_sync"]
        names = [f"{name} (unsharded)" for name in PARAMS]
        assert no_sync["rows"] == [[name, "new"] for name in names]
        assert no_sync["after"]["model.0.weight (unsharded)"]["numel"] == 64
        assert "no-grad" not in [kind for kind, _ in no_sync["findings"]]
    # A DTensor as the user's own leaf keeps its name: d(w·w)/dw = 2w, shard by shard.
    for rank, result in enumerate(results):
        leaf = result["leaf"]
        assert leaf["rows"] == [["w", "new"]]
        assert result["leaf_grad"] == [2.0 * v for v in range(4 * rank, 4 * rank + 4)]
        after = leaf["after"]["w"]
        assert after["numel"] == 4 and after["text"].startswith("this rank's shard (4 of 8")
        assert abs(after["norm"] - sum(v * v for v in result["leaf_grad"]) ** 0.5) < 1e-6


def test_fsdp2_one_rank_reads_whole_gradients(tmp_path):
    (result,) = _run(tmp_path, 1)
    _common(result)
    for rep in result["reports"]:
        # The only shard is the whole tensor: small gradients are exact, large ones summaries.
        assert len(rep["after"]["model.0.bias"]["values"]) == 8
        weight = rep["after"]["model.0.weight"]
        assert weight["numel"] == 64 and weight["text"].startswith("‖g‖=")
        assert "this rank's" not in rep["text"]
        assert "gradient flow: RMS |grad| from " in rep["text"]
    leaf = result["leaf"]
    assert leaf["rows"] == [["w", "new"]]
    assert leaf["after"]["w"]["values"] == [2.0 * v for v in range(8)]
