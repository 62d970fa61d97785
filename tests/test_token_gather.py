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


@pytest.mark.parametrize("qkv", ["separate", "split", "gather"])
@pytest.mark.parametrize("pooling,prefix,grid,target", [
    ("cls", 1, (2, 3), "block1_in"), ("cls_dist_mean", 2, (3, 2), "block1_in"),
    ("cls_concat_mean", 1, (2, 2), "block1_in"), ("cls", 5, (2, 3), "block0_in"), ("token_mean", 1, (2, 2), "block1_in")],
    ids=str)
def test_values_and_gradients_are_unchanged(pooling, prefix, grid, target, qkv):
    model = vit(pooling=pooling, prefix=prefix, grid=grid, blocks=2, qkv=qkv)
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
    g = _Graph.build(pushed)
    last_relu = [g.shape(n.input[0]) for n in pushed.graph.node if n.op_type == "Relu"][-1]
    last_softmax = [g.shape(n.input[0]) for n in pushed.graph.node if n.op_type == "Softmax"][-1]
    tokens = prefix + grid[0] * grid[1]
    if pooling in ("cls", "cls_dist_mean"):
        # the last block's MLP runs on the pooled tokens, its attention on their queries alone
        read = 1 if pooling == "cls" else 2
        assert pushed is not head
        assert last_relu[1] == read and last_softmax[2:] == (read, tokens)
        # the last block projects the query, the attention output and the MLP for the pooled tokens
        # alone, the keys and values for all (a fused projection is split into its parts first)
        rows = [g.shape(n.output[0])[1] for n in pushed.graph.node
                if n.op_type == "MatMul" and g.constant(n.input[1]) is not None]
        assert rows.count(read) == 4 and rows.count(tokens) == 2 + 6 * (target == "block0_in")
        if target == "block0_in":  # the first block's output feeds every token of the second
            assert [g.shape(n.input[0]) for n in pushed.graph.node if n.op_type == "Softmax"][0][2] == tokens
    else:  # the head reads every token (a mean): nothing to move
        assert pushed is head and last_relu[1] == tokens and last_softmax[2:] == (tokens, tokens)
    assert head.SerializeToString() == original  # the input model is untouched
