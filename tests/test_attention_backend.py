"""Attention probabilities and their in-graph gradients (backends.attention_graph, OrtBackend.run_attention),
rollout and GAE through the Explainer, on tiny transformers built with onnx.helper (tests/vit_zoo.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import camcore
from backends import attention_graph, backprop
from camcore import NotCamCompatible
from camcore.methods import gae, rollout
from tests.test_attention import gae_reference, rollout_reference
from tests.vit_zoo import vit

CASES = [("cls", 1, (2, 3)), ("cls_dist_mean", 2, (3, 2)), ("token_mean", 0, (2, 2)),
         ("token_mean_no_prefix", 4, (2, 3)), ("cls_concat_mean", 1, (1, 4))]


def _session(model):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class _Reference:
    """onnx's reference evaluator in float64 (onnxruntime's CPU Conv has no double kernel)."""

    def __init__(self, model):
        from onnx.reference import ReferenceEvaluator

        self.evaluator = ReferenceEvaluator(model)

    def run(self, names, feed):
        return self.evaluator.run(names, feed)


def _x(model, n=2, seed=0):
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).standard_normal((n, *dims[1:])).astype(np.float64)


def _in_double(model):
    """The same model in float64, so that finite differences are exact to ~1e-9."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float64), t.name))
    for vi in [*out.graph.input, *out.graph.output]:
        vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    return out


def _perturbable(model, names):
    """A copy where each attention tensor `a` is ``Softmax(...) + eps_a``, eps_a a (1, 1, T, T) input."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        if node.output[0] in names:
            a = node.output[0]
            node.output[0] = f"{a}_raw"
            nodes += [node, helper.make_node("Add", [f"{a}_raw", f"eps_{a}"], [a])]
        else:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


@pytest.mark.parametrize("pooling,prefix,grid", CASES, ids=str)
def test_attention_gradients_match_finite_differences(pooling, prefix, grid):
    model = _in_double(vit(pooling=pooling, prefix=prefix, grid=grid, blocks=2))
    names = attention_graph.attention_probabilities(model)
    assert names == ("attn0", "attn1")
    x = _x(model, n=1, seed=3)
    built = attention_graph.attention_model(model, names, "logits", gradients=True)
    seed = np.zeros((1, 5))
    seed[0, 2] = 1.0
    fetch = ["logits", *names, *(attention_graph.gradient_name(a) for a in names)]
    out = dict(zip(fetch, _Reference(built).run(fetch, {"x": x, attention_graph.ATTENTION_SEED: seed})))
    tokens = prefix + grid[0] * grid[1]
    for a in names:
        assert out[a].shape == (1, 1, tokens, tokens)
        np.testing.assert_allclose(out[a].sum(-1), 1.0, rtol=1e-12)

    bumped = _perturbable(model, names)
    for a in names:
        bumped.graph.input.append(helper.make_tensor_value_info(f"eps_{a}", TensorProto.DOUBLE, [1, 1, tokens, tokens]))
    session = _Reference(bumped)
    zero = {f"eps_{a}": np.zeros((1, 1, tokens, tokens)) for a in names}

    def logit(eps):
        return session.run(["logits"], {"x": x, **eps})[0][0, 2]

    h = 1e-6
    for a in names:
        fd = np.zeros((tokens, tokens))
        for i in range(tokens):
            for j in range(tokens):
                plus, minus = dict(zero), dict(zero)
                plus[f"eps_{a}"] = zero[f"eps_{a}"].copy()
                plus[f"eps_{a}"][0, 0, i, j] = h
                minus[f"eps_{a}"] = zero[f"eps_{a}"].copy()
                minus[f"eps_{a}"][0, 0, i, j] = -h
                fd[i, j] = (logit(plus) - logit(minus)) / (2 * h)
        got = out[attention_graph.gradient_name(a)][0, 0]
        assert np.abs(fd).max() > 1e-3  # the logit does depend on this layer's attention
        np.testing.assert_allclose(got, fd, rtol=1e-4, atol=1e-7 * np.abs(fd).max())


def test_several_wrt_match_one_at_a_time():
    """One reverse pass to several tensors gives what separate passes give, also for a tensor upstream of another."""
    model = vit(pooling="cls", prefix=1, grid=(2, 3), blocks=2)
    x = _x(model, n=2).astype(np.float32)
    seed = np.random.default_rng(1).standard_normal((2, 5)).astype(np.float32)
    wrts = ["attn0", "block1_in", "attn1"]
    together = backprop.add_backward(model, wrts, "logits", grad=["g0", "g1", "g2"])
    got = _session(together).run(["g0", "g1", "g2"], {"x": x, "cam_seed": seed})
    for name, value in zip(wrts, got):
        alone = backprop.add_backward(model, name, "logits")
        (want,) = _session(alone).run(["cam_grad"], {"x": x, "cam_seed": seed})
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)
        assert np.abs(want).max() > 0


def test_several_wrt_refuse_a_tensor_the_logits_do_not_read():
    model = vit(pooling="cls", prefix=1, grid=(2, 3), blocks=1)
    with pytest.raises(NotCamCompatible, match="tensor 'nowhere' is not in the model"):
        backprop.add_backward(model, ["attn0", "nowhere"], "logits")
    model.graph.node.append(helper.make_node("Neg", ["x"], ["side"]))  # read by nothing on the way to the logits
    with pytest.raises(NotCamCompatible, match="'logits' does not depend on 'side'"):
        backprop.add_backward(model, ["attn0", "side"], "logits")
    with pytest.raises(NotCamCompatible, match="one distinct gradient name each"):
        backprop.add_backward(model, ["attn0", "attn0"], "logits")


@pytest.mark.parametrize("pooling,prefix,grid", CASES, ids=str)
def test_explainer_rollout_and_gae_match_the_numpy_reference(pooling, prefix, grid):
    model = vit(pooling=pooling, prefix=prefix, grid=grid, blocks=3)
    explainer = camcore.load(model, providers=["cpu"])
    x = _x(model, n=3).astype(np.float32)
    ro = explainer.explain(x, top_k=2, method="rollout")
    ga = explainer.explain(x, top_k=2, method="gae")
    assert ro.maps.shape == ga.maps.shape == (3, 2, *grid)

    # the reference reads the probabilities from a plain run and takes gradients one class at a time
    names = ("attn0", "attn1", "attn2")
    built = attention_graph.attention_model(model, names, "logits", gradients=True)
    session = _session(built)
    att = [session.run([a], {"x": x, attention_graph.ATTENTION_SEED: np.zeros((3, 5), np.float32)})[0]
           for a in names]
    want = rollout_reference([a.astype(np.float64) for a in att], prefix, grid, pooling)
    np.testing.assert_allclose(ro.maps[:, 0], want, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(ro.maps[:, 0], ro.maps[:, 1])
    grads = []
    for a in names:
        per_class = []
        for j in range(2):
            seed = np.zeros((3, 5), np.float32)
            seed[np.arange(3), ga.classes[:, j]] = 1
            per_class.append(session.run([attention_graph.gradient_name(a)],
                                         {"x": x, attention_graph.ATTENTION_SEED: seed})[0])
        grads.append(np.stack(per_class, axis=1).astype(np.float64))
    want = gae_reference([a.astype(np.float64) for a in att], grads, prefix, grid, pooling)
    np.testing.assert_allclose(ga.maps, want, rtol=1e-4, atol=1e-6)
    assert np.abs(ga.maps).max() > 0 and not np.allclose(ga.maps[:, 0], ga.maps[:, 1])
    # the registered functions agree with the loop reference on what the backend gave
    np.testing.assert_allclose(gae(att, grads, prefix=prefix, grid=grid, pooling=pooling), want, rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(rollout(att, prefix=prefix, grid=grid, pooling=pooling), ro.maps[:, 0], rtol=1e-5)


def test_cnn_and_fused_attention_are_refused_in_one_line():
    cnn = camcore.load(None, providers=["cpu"])  # the embedded EfficientNet-Lite0
    x = np.zeros((1, *cnn.head.input.shape[1:]), np.float32)
    for method in ("rollout", "gae"):
        with pytest.raises(NotCamCompatible, match=rf"^{method} needs attention maps of a vision transformer, and "
                                                   r"this model pools no tokens; the feature methods apply \(gradcam"
                           ) as err:
            cnn.explain(x, method=method)
        assert "\n" not in str(err.value)

    model = vit(pooling="cls", prefix=1, grid=(2, 2), blocks=1)
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    for node in fused.graph.node:  # stand-in for a fused attention op: no Softmax probabilities to read
        if node.op_type == "Softmax":
            node.op_type, node.domain = "Attention", "com.microsoft"
    with pytest.raises(NotCamCompatible, match="fused Attention op.*reciprocam") as err:
        attention_graph.attention_probabilities(fused)
    assert "\n" not in str(err.value)


def test_windowed_attention_is_refused_naming_the_token_counts():
    model = vit(pooling="cls", prefix=1, grid=(2, 3), blocks=1)
    with pytest.raises(NotCamCompatible, match=r"1 of its attention layers are not over the image's 13 tokens \(7x7: windowed"):
        attention_graph.attention_probabilities(model, tokens=13)
