"""backends.token_gather: a one-token Gather moved above the per-token ops changes no value, no gradient."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from backends import backprop
from backends.onnx_graph import _Graph
from backends.token_gather import push_token_gather
from tests.vit_zoo import vit


def _run(model, names, feed):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(names, feed)


@pytest.mark.parametrize("pooling,prefix,grid,target", [
    ("cls", 1, (2, 3), "block1_in"), ("cls_dist_mean", 2, (3, 2), "block1_in"),
    ("cls_concat_mean", 1, (2, 2), "block1_in"), ("cls", 5, (2, 3), "block0_in"), ("token_mean", 1, (2, 2), "block1_in")],
    ids=str)
def test_values_and_gradients_are_unchanged(pooling, prefix, grid, target):
    model = vit(pooling=pooling, prefix=prefix, grid=grid, blocks=2)
    head, _ = backprop.cut_head(model, target, "logits")
    original = head.SerializeToString()
    pushed = push_token_gather(head)
    onnx.checker.check_model(pushed)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, prefix + grid[0] * grid[1], 8)).astype(np.float32)
    seed = rng.standard_normal((3, 5)).astype(np.float32)
    before = _run(backprop.add_backward(head, target, "logits"), ["logits", "cam_grad"], {target: x, "cam_seed": seed})
    after = _run(backprop.add_backward(pushed, target, "logits"), ["logits", "cam_grad"], {target: x, "cam_seed": seed})
    np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after[1], before[1], rtol=1e-5, atol=1e-6)
    assert np.abs(before[1]).max() > 0
    relus = [n for n in pushed.graph.node if n.op_type == "Relu"]
    ranks = [len(_Graph.build(pushed).shape(n.input[0])) for n in relus]
    if pooling == "cls":
        # the last block's MLP now runs on (N, C) tokens, not (N, T, C); the head is smaller
        assert ranks[-1] == 2 and pushed is not head
    else:  # the head reads several tokens (two Gathers, or a mean): nothing to move
        assert pushed is head and all(r == 3 for r in ranks)
    assert head.SerializeToString() == original  # the input model is untouched
