"""backends.backprop: every gradient rule against central finite differences in float64.

The float64 evaluator is `onnx.reference` (onnxruntime lacks double kernels for several
ops), with ops replaced where it is not exact or wrong: its Erf/Gelu use a float
approximation (1e-8 off, too coarse for finite differences), its grouped ConvTranspose
fails, its (Log)Softmax before opset 13 ignores the 2-D coercion and its
BatchNormalization before opset 14 differs from onnxruntime.  Its pooling is wrong with
pads and ceil_mode, and it cannot run negative pads: those are checked against
onnxruntime's forward (`check_ort_forward`).  The common ops also run under onnxruntime
in float32 and are compared with the float64 gradient.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import scipy.special
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from backends.backprop import add_backward, cut_head, gradient_model
from camcore.errors import InvalidInput, NotCamCompatible
from tests.fakes import run_time_reduce_axes

ort = pytest.importorskip("onnxruntime")

D, F = TensorProto.DOUBLE, TensorProto.FLOAT
FAST = settings(max_examples=25, deadline=None, derandomize=True)


class Erf(OpRun):
    def _run(self, x):
        return (scipy.special.erf(x).astype(x.dtype),)


class Gelu(OpRun):
    def _run(self, x, approximate="none"):
        if approximate == "tanh":
            return ((0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))).astype(x.dtype),)
        return ((0.5 * x * (1 + scipy.special.erf(x / np.sqrt(2)))).astype(x.dtype),)


class ConvTranspose(OpRun):
    """The ONNX definition, written directly: each input pixel scatters its kernel window."""

    def _run(self, x, w, b=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
             output_padding=None, output_shape=None, pads=None, strides=None):
        n = x.ndim - 2
        k = w.shape[2:]
        s, d = strides or [1] * n, dilations or [1] * n
        pads, op = pads or [0] * 2 * n, output_padding or [0] * n
        group = group or 1
        full = [s[i] * (x.shape[2 + i] - 1) + (k[i] - 1) * d[i] + 1 + op[i] for i in range(n)]
        cin, cout = x.shape[1] // group, w.shape[1]
        out = np.zeros((x.shape[0], cout * group, *full), dtype=x.dtype)
        for gi in range(group):
            xg, wg = x[:, gi * cin:(gi + 1) * cin], w[gi * cin:(gi + 1) * cin]
            for j in itertools.product(*(range(kk) for kk in k)):
                contribution = np.einsum("nm...,mc->nc...", xg, wg[(slice(None), slice(None), *j)])
                where = tuple(slice(j[i] * d[i], j[i] * d[i] + s[i] * (x.shape[2 + i] - 1) + 1, s[i]) for i in range(n))
                out[(slice(None), slice(gi * cout, (gi + 1) * cout), *where)] += contribution
        crop = tuple(slice(pads[i], full[i] - pads[n + i]) for i in range(n))
        out = out[(slice(None), slice(None), *crop)]
        if b is not None:
            out = out + b.reshape(-1, *[1] * n)
        return (out,)


class _Coerced(OpRun):
    """(Log)Softmax before opset 13: over all axes from `axis` on (onnx.reference ignores that)."""

    def _run(self, x, axis=1):
        axes = tuple(range(axis % x.ndim, x.ndim))
        shifted = x - x.max(axis=axes, keepdims=True)
        log = shifted - np.log(np.exp(shifted).sum(axis=axes, keepdims=True))
        return (log if self.log else np.exp(log),)


class Softmax(_Coerced):
    log = False


class LogSoftmax(_Coerced):
    log = True


class BatchNormalization(OpRun):
    """Inference form (onnx.reference's version 9 differs from onnxruntime)."""

    def _run(self, x, scale, bias, mean, var, epsilon=1e-5, momentum=None, training_mode=None):
        shape = (-1,) + (1,) * (x.ndim - 2)
        return ((x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + epsilon) * scale.reshape(shape)
                + bias.reshape(shape),)


def evaluator(model):
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    fixes = [Erf, Gelu, ConvTranspose, *([Softmax, LogSoftmax] if opset < 13 else []),
             *([BatchNormalization] if opset < 14 else [])]
    return ReferenceEvaluator(model, new_ops=fixes)


def make(nodes, inputs, *, inits=None, opset=17, dtype=D, out="y", out_rank=None):
    """A one-output model; `inputs` maps names to shapes (float inputs of `dtype`)."""
    npd = helper.tensor_dtype_to_np_dtype(dtype)
    initializers = [numpy_helper.from_array(np.asarray(v, npd) if np.asarray(v).dtype.kind == "f" else np.asarray(v), k)
                    for k, v in (inits or {}).items()]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(n, dtype, s) for n, s in inputs.items()],
                              [helper.make_tensor_value_info(out, dtype, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    # Declare the output's rank only: onnx shape inference miscounts some ceil_mode pools.
    if out_rank is None:
        out_rank = len(onnx.shape_inference.infer_shapes(model).graph.output[0].type.tensor_type.shape.dim)
    model.graph.output[0].type.CopyFrom(helper.make_tensor_type_proto(dtype, [None] * out_rank))
    return model


def checked(model):
    onnx.checker.check_model(model, full_check=True)
    return model


def finite_differences(run, feeds, wrt, seed, eps=1e-6):
    x = feeds[wrt]
    out = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[i] += eps
        minus[i] -= eps
        out[i] = (np.sum(seed * run({**feeds, wrt: plus})) - np.sum(seed * run({**feeds, wrt: minus}))) / (2 * eps)
    return out


def check(build, feeds, wrt="x", *, of="y", use_ort=False, eps=1e-6, rtol=1e-6, atol=1e-7, seed=0):
    """Gradient of sum(seed * of) w.r.t. `wrt` against finite differences (and onnxruntime).

    `build(dtype)` returns the model; returns the float64 gradient.
    """
    model = build(D)
    before = model.SerializeToString()
    back = add_backward(model, wrt, of)
    assert model.SerializeToString() == before
    onnx.checker.check_model(back, full_check=True)
    assert add_backward(model, wrt, of).SerializeToString() == back.SerializeToString()
    forward = evaluator(model)
    y = forward.run([of], feeds)[0]
    s = normal(y.shape, seed)
    outputs = evaluator(back).run(None, {**feeds, "cam_seed": s})
    grad = outputs[-1]
    assert grad.shape == feeds[wrt].shape
    np.testing.assert_allclose(outputs[0], forward.run(None, feeds)[0])
    expected = finite_differences(lambda f: forward.run([of], f)[0], feeds, wrt, s, eps)
    np.testing.assert_allclose(grad, expected, rtol=rtol, atol=atol * max(1.0, np.abs(expected).max()))
    if use_ort:
        back32 = add_backward(build(F), wrt, of)
        onnx.checker.check_model(back32, full_check=True)
        session = ort.InferenceSession(back32.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds32 = {k: np.asarray(v, np.float32) if v.dtype == np.float64 else v for k, v in feeds.items()}
        grad32 = session.run(["cam_grad"], {**feeds32, "cam_seed": np.asarray(s, np.float32)})[0]
        np.testing.assert_allclose(grad32, grad, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(grad).max()))
    return grad


def check_ort_forward(build, x, *, float64=True):
    """Against finite differences of onnxruntime's float32 forward, for piecewise-linear
    ops that onnx.reference gets wrong (pooling with pads or ceil_mode, negative pads):
    away from ties the differences are exact up to float32 rounding."""
    back = add_backward(build(F), "x", "y")
    onnx.checker.check_model(back, full_check=True)
    forward = ort.InferenceSession(build(F).SerializeToString(), providers=["CPUExecutionProvider"])
    backward = ort.InferenceSession(back.SerializeToString(), providers=["CPUExecutionProvider"])
    x = x.astype(np.float32)
    seed = normal(forward.run(None, {"x": x})[0].shape, 1).astype(np.float32)
    grad = backward.run(["cam_grad"], {"x": x, "cam_seed": seed})[0]
    expected = finite_differences(lambda f: forward.run(None, f)[0].astype(np.float64), {"x": x}, "x", seed, 1e-2)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-4)
    if float64:  # the same gradient graph in float64 (it reads no forward pooling output)
        grad64 = evaluator(add_backward(build(D), "x", "y")).run(
            ["cam_grad"], {"x": x.astype(np.float64), "cam_seed": seed.astype(np.float64)})[0]
        np.testing.assert_allclose(grad64, expected, rtol=1e-4, atol=1e-4)


def normal(shape, seed=0, scale=1.0):
    return np.asarray(np.random.default_rng(seed).standard_normal(shape) * scale)


def node(op, inputs, outputs=("y",), **attrs):
    return helper.make_node(op, list(inputs), list(outputs), name=f"n_{op.lower()}_{outputs[0]}", **attrs)


# ------------------------------------------------------------------ elementwise unary

POSITIVE = {"Sqrt", "Reciprocal", "Log"}
UNARY = [
    ("Identity", {}, 11), ("Neg", {}, 11), ("Sqrt", {}, 11), ("Reciprocal", {}, 11), ("Exp", {}, 11),
    ("Log", {}, 11), ("Relu", {}, 11), ("LeakyRelu", {"alpha": 0.1}, 11), ("Elu", {"alpha": 0.7}, 11),
    ("Sigmoid", {}, 11), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, 11), ("HardSwish", {}, 14),
    ("Tanh", {}, 11), ("Erf", {}, 11), ("Gelu", {}, 20), ("Gelu", {"approximate": "tanh"}, 20),
    ("Softplus", {}, 11), ("Softsign", {}, 11), ("Mish", {}, 18), ("Abs", {}, 11),
]


@pytest.mark.parametrize("op, attrs, opset", UNARY, ids=[f"{u[0]}{'-' + str(u[1]) if u[1] else ''}" for u in UNARY])
def test_unary(op, attrs, opset):
    x = normal((2, 3, 4), scale=2.5)
    if op in POSITIVE:
        x = np.abs(x) + 0.3
    check(lambda dt: make([node(op, ["x"], **attrs)], {"x": [2, 3, 4]}, opset=opset, dtype=dt), {"x": x},
          use_ort=True)


@pytest.mark.parametrize("opset", [11, 21])
@pytest.mark.parametrize("bounds", [("lo", "hi"), ("lo", ""), ("", "hi")])
def test_clip(bounds, opset):
    inits = {"lo": np.array(-0.5), "hi": np.array(0.7)}
    check(lambda dt: make([node("Clip", ["x", *bounds])], {"x": [3, 4]}, inits=inits, opset=opset, dtype=dt),
          {"x": normal((3, 4))}, use_ort=True)


def test_cast_and_dropout():
    def build(dt):
        return make([node("Cast", ["x"], ["a"], to=F), node("Cast", ["a"], ["b"], to=dt),
                     node("Dropout", ["b", "ratio"], ["y"])], {"x": [2, 3]}, inits={"ratio": np.array(0.5)},
                    opset=13, dtype=dt)
    # The float32 round trip limits the finite differences' precision.
    check(build, {"x": normal((2, 3))}, eps=1e-3, rtol=1e-4, atol=1e-4)


def test_dropout_in_training_mode_is_refused():
    model = make([node("Dropout", ["x", "ratio", "train"])], {"x": [2, 3]},
                 inits={"ratio": np.array(0.5), "train": np.array(True)}, opset=13)
    with pytest.raises(NotCamCompatible, match="Dropout at node 'n_dropout_y'.*training_mode"):
        add_backward(model, "x", "y")


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax(op, axis, opset):
    check(lambda dt: make([node(op, ["x"], axis=axis)], {"x": [2, 3, 4]}, opset=opset, dtype=dt),
          {"x": normal((2, 3, 4))}, use_ort=True)


# ------------------------------------------------------------------ broadcasting arithmetic

@st.composite
def broadcast_shapes(draw, n=2, first_full=False):
    out = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    shapes = [tuple(out)] if first_full else []
    while len(shapes) < n:
        rank = draw(st.integers(0, len(out)))
        ones = draw(st.lists(st.booleans(), min_size=rank, max_size=rank))
        shapes.append(tuple(1 if one else d for one, d in zip(ones, out[len(out) - rank:])))
    return shapes


BINARY = ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum"]  # Mean: see test_variadic


@pytest.mark.parametrize("op", BINARY)
@settings(max_examples=8, deadline=None, derandomize=True)
@given(shapes=broadcast_shapes(), opset=st.sampled_from([11, 13, 21]))
def test_binary_broadcasting(op, shapes, opset):
    feeds = {"a": normal(shapes[0], 1), "b": normal(shapes[1], 2)}
    if op == "Pow":
        feeds["a"] = np.asarray(np.abs(feeds["a"]) + 0.5)
    if op == "Div":
        feeds["b"] = np.asarray(np.sign(feeds["b"]) * (np.abs(feeds["b"]) + 0.5))
    for wrt in ("a", "b"):
        check(lambda dt: make([node(op, ["a", "b"])], {"a": list(shapes[0]), "b": list(shapes[1])},
                              opset=opset, dtype=dt), feeds, wrt, use_ort=op != "Pow")


@FAST
@given(op=st.sampled_from(["Sum", "Mean", "Max", "Min"]), shapes=broadcast_shapes(3, first_full=True))
def test_variadic(op, shapes):
    # onnx.reference's Mean accumulates in place into its first input: that one is full size.
    feeds = {name: normal(shape, i) for i, (name, shape) in enumerate(zip("abc", shapes))}
    check(lambda dt: make([node(op, ["a", "b", "c"])], {k: list(v.shape) for k, v in feeds.items()}, dtype=dt),
          feeds, "b", use_ort=True)


def test_max_ties_share_the_gradient():
    model = make([node("Max", ["a", "b"])], {"a": [3], "b": [3]})
    grad = evaluator(checked(add_backward(model, "a", "y"))).run(
        ["cam_grad"], {"a": np.array([1.0, 2.0, 3.0]), "b": np.array([1.0, 3.0, 2.0]), "cam_seed": np.ones(3)})[0]
    np.testing.assert_array_equal(grad, [0.5, 0.0, 1.0])


@FAST
@given(shapes=broadcast_shapes(3))
def test_where(shapes):
    cond = normal(shapes[0], 5) > 0
    feeds = {"a": normal(shapes[1], 1), "b": normal(shapes[2], 2)}
    for wrt in ("a", "b"):
        check(lambda dt: make([node("Where", ["cond", "a", "b"])], {k: list(v.shape) for k, v in feeds.items()},
                              inits={"cond": cond}, dtype=dt), feeds, wrt, use_ort=True)


@pytest.mark.parametrize("slope_shape", [(1,), (3, 1, 1), (2,)])
def test_prelu(slope_shape):
    feeds = {"x": normal((2, 3, 2, 2)), "slope": normal(slope_shape, 1)}
    for wrt in ("x", "slope"):
        check(lambda dt: make([node("PRelu", ["x", "slope"])], {"x": [2, 3, 2, 2], "slope": list(slope_shape)},
                              dtype=dt), feeds, wrt, use_ort=True)


def _open_sums(model) -> int:
    """How many sums of `model` a run-time size selects (``Where`` then a ``Slice`` to that size)."""
    return sum(n.op_type == "Where" and n.name.startswith("cam_") for n in model.graph.node)


@pytest.mark.parametrize("opset", [12, 13, 17])
@pytest.mark.parametrize("b_shape, b_dims", [((1, 3), ["m", 3]), ((1,), ["m"]), ((2, 1), ["m", "k"]),
                                             ((2, 3), ["m", "k"])])
def test_broadcasting_decided_at_run_time(opset, b_shape, b_dims):
    """Symbolic dims hide which side broadcasts: each open axis is summed over a constant axis,
    and the run-time sizes select the sum or the gradient as it is (OpenVINO's reader needs the
    axes constant)."""
    feeds = {"a": normal((2, 3)), "b": normal(b_shape, 1)}
    for wrt in ("a", "b"):
        build = lambda dt: make([node("Mul", ["a", "b"])], {"a": ["n", "j"], "b": b_dims}, opset=opset, dtype=dt)
        back = add_backward(build(D), wrt, "y")
        assert run_time_reduce_axes(back) == []
        assert _open_sums(back) >= 1
        check(build, feeds, wrt, use_ort=True)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("op, b_shape", [("Add", (4,)), ("Mul", (3, 1)), ("Sub", (1, 3, 4)), ("Div", (1, 1, 4)),
                                         ("Where", (3, 4))])
def test_symbolic_batch_named_apart_is_summed_with_constant_axes(op, b_shape, batch):
    """tf2onnx declares each output's batch with a symbol of its own (``unk__0``): the batch of
    `a` still is the output's, since `b` cannot stretch it; the axes summed for `b` are constants
    too.  OpenVINO's ONNX reader needs them so."""
    feeds = {"a": normal((batch, 3, 4)), "b": normal(b_shape, 1) + (3.0 if op == "Div" else 0.0)}
    cond = normal((1, 3, 1), 5) > 0
    inputs = ["cond", "a", "b"] if op == "Where" else ["a", "b"]

    def build(dt):
        model = make([node(op, inputs)], {"a": ["unk__1", 3, 4], "b": list(b_shape)},
                     inits={"cond": cond} if op == "Where" else None, dtype=dt)
        model.graph.output[0].type.CopyFrom(helper.make_tensor_type_proto(dt, ["unk__0", 3, 4]))
        return model

    for wrt in ("a", "b"):
        assert run_time_reduce_axes(add_backward(build(D), wrt, "y")) == []
        check(build, feeds, wrt, use_ort=True)


@pytest.mark.parametrize("transpose", [0, 1])
def test_gemm_bias_under_a_symbolic_batch_is_summed_with_constant_axes(transpose):
    """Gemm's C of shape (1, N) or (M?, N): its batch axis is summed (a constant axis) only where
    C has a 1; a C batched like A keeps it."""
    for c_shape, c_dims in [((1, 3), [1, 3]), ((2, 3), ["unk__2", 3])]:
        a_shape = (4, 2) if transpose else (2, 4)
        a_dims = [4, "unk__2"] if transpose else ["unk__2", 4]
        feeds = {"a": normal(a_shape), "c": normal(c_shape, 1)}

        def build(dt):
            model = make([node("Gemm", ["a", "w", "c"], transA=transpose)], {"a": a_dims, "c": c_dims},
                         inits={"w": normal((4, 3), 2)}, dtype=dt)
            model.graph.output[0].type.CopyFrom(helper.make_tensor_type_proto(dt, ["unk__0", 3]))
            return model

        for wrt in ("a", "c"):
            assert run_time_reduce_axes(add_backward(build(D), wrt, "y")) == []
            check(build, feeds, wrt, use_ort=True)


@pytest.mark.parametrize("batch", [1, 3])
def test_sizes_the_batch_decides_are_read_at_two_probe_batches(batch):
    """TorchScript's attention reshapes to ``(batch, -1, heads, d)``: onnx's inference cannot
    divide by the symbol, so the token axis gets a symbol of its own, which the residual's 6 could
    be a stretched 1 of.  Inferred again at two concrete batches, the axis is 6: the residual's
    sum has constant axes and no run-time selection."""
    feeds = {"x": normal((batch, 6, 4)), "r": normal((batch, 6, 4), 1)}

    def build(dt):
        nodes = [node("Shape", ["x"], ["s"]), node("Slice", ["s", "zero", "one"], ["n"]),
                 node("Concat", ["n", "split"], ["heads_shape"], axis=0), node("Reshape", ["x", "heads_shape"], ["h"]),
                 node("Concat", ["n", "merge"], ["merge_shape"], axis=0), node("Reshape", ["h", "merge_shape"], ["m"]),
                 node("Add", ["m", "r"])]
        inits = {"zero": np.array([0]), "one": np.array([1]), "split": np.array([-1, 2, 2]), "merge": np.array([-1, 4])}
        return make(nodes, {"x": ["batch", 6, 4], "r": ["batch", 6, 4]}, inits=inits, dtype=dt)

    inferred = onnx.shape_inference.infer_shapes(build(D), data_prop=True)
    token_axis = {vi.name: vi.type.tensor_type.shape for vi in inferred.graph.value_info}["m"].dim[1]
    assert not token_axis.dim_value  # what onnx's inference alone gives
    back = add_backward(build(D), "x", "y")
    assert run_time_reduce_axes(back) == [] and _open_sums(back) == 0
    check(build, feeds, "x", use_ort=True)


@pytest.mark.parametrize("b_batch", ["m", 1])
def test_matmul_batch_under_symbolic_dims(b_batch):
    """MatMul's batch axes: `a`'s symbolic batch is kept where `b` has none or a 1; a batch
    axis two symbols may each stretch is summed, and the run-time sizes select that sum."""
    feeds = {"a": normal((2, 3, 4)), "b": normal((4, 5), 1)}
    build = lambda dt: make([node("MatMul", ["a", "b"])], {"a": ["n", 3, 4], "b": [4, 5]}, dtype=dt)
    assert run_time_reduce_axes(add_backward(build(D), "a", "y")) == []
    check(build, feeds, "a", use_ort=True)
    stretched = b_batch == "m"  # a's batch of 1 stretched by b's 2
    feeds = {"a": normal((1 if stretched else 2, 3, 4)), "b": normal((2 if stretched else 1, 4, 5), 1)}
    build = lambda dt: make([node("MatMul", ["a", "b"])], {"a": ["n", 3, 4], "b": [b_batch, 4, 5]}, dtype=dt)
    back = add_backward(build(D), "a", "y")
    assert run_time_reduce_axes(back) == [] and (_open_sums(back) > 0) == stretched
    check(build, feeds, "a", use_ort=True)


# ------------------------------------------------------------------ shape ops

def _axes(name, axes, opset, limit):
    """(inputs, attrs, inits) for an op taking `axes` as input from `limit`."""
    if opset >= limit:
        return [name], {}, {name: np.array(axes, dtype=np.int64)}
    return [], {"axes": axes}, {}


@pytest.mark.parametrize("opset", [11, 13])
def test_reshape_family(opset):
    sq_in, sq_attr, sq_init = _axes("sq", [2], opset, 13)
    un_in, un_attr, un_init = _axes("un", [0, 3], opset, 13)
    nodes = [node("Flatten", ["x"], ["f"], axis=2), node("Reshape", ["f", "shape"], ["r"]),
             node("Unsqueeze", ["r", *un_in], ["u"], **un_attr), node("Squeeze", ["u", *sq_in], ["y"], **sq_attr)]
    inits = {"shape": np.array([3, 1, -1], dtype=np.int64), **sq_init, **un_init}
    check(lambda dt: make(nodes, {"x": [1, 3, 2, 2]}, inits=inits, opset=opset, dtype=dt),
          {"x": normal((1, 3, 2, 2))}, use_ort=True)


@FAST
@given(perm=st.permutations([0, 1, 2]))
def test_transpose(perm):
    check(lambda dt: make([node("Transpose", ["x"], perm=list(perm))], {"x": [2, 3, 4]}, dtype=dt),
          {"x": normal((2, 3, 4))}, use_ort=True)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concat_reads_x_twice(axis):
    check(lambda dt: make([node("Concat", ["x", "c", "x"], axis=axis)], {"x": [2, 2]},
                          inits={"c": normal((2, 2), 1)}, dtype=dt), {"x": normal((2, 2))}, use_ort=True)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_with_an_unused_output(opset):
    split = np.array([1, 2, 3], dtype=np.int64)
    inputs, attrs, inits = (["x"], {"split": list(split)}, {}) if opset < 13 else (["x", "split"], {}, {"split": split})
    nodes = [node("Split", inputs, ["o0", "o1", "o2"], axis=1, **attrs), node("Concat", ["o2", "o0"], axis=1)]
    check(lambda dt: make(nodes, {"x": [2, 6]}, inits=inits, opset=opset, dtype=dt), {"x": normal((2, 6))},
          use_ort=True)


@FAST
@given(data=st.data())
def test_slice(data):
    shape = (4, 5)
    axes = data.draw(st.lists(st.sampled_from([0, 1, -1]), min_size=1, max_size=2, unique_by=lambda a: a % 2))
    starts = data.draw(st.lists(st.integers(-6, 6), min_size=len(axes), max_size=len(axes)))
    ends = data.draw(st.lists(st.integers(-6, 6), min_size=len(axes), max_size=len(axes)))
    steps = data.draw(st.lists(st.sampled_from([-2, -1, 1, 2, 3]), min_size=len(axes), max_size=len(axes)))
    index = [slice(None)] * 2
    for a, b, e, t in zip(axes, starts, ends, steps):
        index[a] = slice(b, e, t)
    assume(normal(shape)[tuple(index)].size > 0)  # an empty output has nothing to seed
    inits = {k: np.array(v, dtype=np.int64) for k, v in zip(["s", "e", "a", "t"], [starts, ends, axes, steps])}
    check(lambda dt: make([node("Slice", ["x", "s", "e", "a", "t"])], {"x": list(shape)}, inits=inits, opset=13,
                          dtype=dt), {"x": normal(shape)}, use_ort=True)


@pytest.mark.parametrize("opset, indices, axis", [
    (13, np.array([2, 0]), 1), (13, np.array(-1), 0), (16, np.array([[1, 1], [0, 1]]), 1),
    (16, np.array([0, 0, 2]), 0)])
def test_gather(opset, indices, axis):
    check(lambda dt: make([node("Gather", ["x", "i"], axis=axis)], {"x": [3, 3]}, inits={"i": indices},
                          opset=opset, dtype=dt), {"x": normal((3, 3))}, use_ort=True)


def test_gather_with_repeated_indices_before_opset_16_is_refused():
    model = make([node("Gather", ["x", "i"])], {"x": [3, 3]}, inits={"i": np.array([1, 1])}, opset=13)
    with pytest.raises(NotCamCompatible, match="Gather at node 'n_gather_y'"):
        add_backward(model, "x", "y")


def test_gather_elements():
    indices = np.array([[0, 2, 2], [1, 1, 0]])
    check(lambda dt: make([node("GatherElements", ["x", "i"], axis=1)], {"x": [2, 3]}, inits={"i": indices},
                          opset=16, dtype=dt), {"x": normal((2, 3))}, use_ort=True)


def test_expand():
    check(lambda dt: make([node("Expand", ["x", "shape"])], {"x": [3, 1]},
                          inits={"shape": np.array([2, 3, 4], dtype=np.int64)}, dtype=dt),
          {"x": normal((3, 1))}, use_ort=True)


@pytest.mark.parametrize("opset, pads, axes", [
    (11, [0, 1, 2, 1, 0, 1], None), (13, [1, 0, 0, 0, 2, 1], None), (18, [1, 0, 2, 1], [2, 1])])
def test_pad(opset, pads, axes):
    inits = {"pads": np.array(pads, dtype=np.int64), "value": np.array(1.5)}
    inputs = ["x", "pads", "value"] + (["axes"] if axes else [])
    if axes:
        inits["axes"] = np.array(axes, dtype=np.int64)
    check(lambda dt: make([node("Pad", inputs)], {"x": [2, 3, 4]}, inits=inits, opset=opset, dtype=dt),
          {"x": normal((2, 3, 4))}, use_ort=True)


@pytest.mark.parametrize("opset, pads, axes", [(11, [1, -1, 0, -1, 2, 1], None), (18, [-1, 2, 1, -2], [2, 1])])
def test_pad_with_negative_pads(opset, pads, axes):
    """Negative pads crop (onnx.reference cannot run them)."""
    inits = {"pads": np.array(pads, dtype=np.int64)}
    if axes:
        inits["axes"] = np.array(axes, dtype=np.int64)
    inputs = ["x", "pads", *(["", "axes"] if axes else [])]
    check_ort_forward(lambda dt: make([node("Pad", inputs)], {"x": [2, 3, 4]}, inits=inits, opset=opset, dtype=dt),
                      normal((2, 3, 4)), float64=False)


def test_pad_with_pads_computed_at_run_time():
    """As tf2onnx's static padding: pads derived from the input's shape."""
    nodes = [node("Shape", ["x"], ["shape"]), node("Slice", ["shape", "two", "four"], ["hw"]),
             node("Sub", ["eight", "hw"], ["missing"]), node("Concat", ["zeros", "missing", "zeros", "ones"], ["pads"],
                                                            axis=0),
             node("Pad", ["x", "pads"])]
    inits = {"two": np.array([2]), "four": np.array([4]), "eight": np.array([8, 8]), "zeros": np.array([0, 0]),
             "ones": np.array([1, 1])}
    check(lambda dt: make(nodes, {"x": [1, 2, 5, 6]}, inits=inits, opset=13, dtype=dt), {"x": normal((1, 2, 5, 6))},
          use_ort=True)


def test_reflect_pad_is_refused():
    model = make([node("Pad", ["x", "pads"], mode="reflect")], {"x": [2, 3]},
                 inits={"pads": np.array([0, 1, 0, 1], dtype=np.int64)})
    with pytest.raises(NotCamCompatible, match="Pad at node 'n_pad_y'.*constant"):
        add_backward(model, "x", "y")


# ------------------------------------------------------------------ linear algebra

@FAST
@given(ta=st.integers(0, 1), tb=st.integers(0, 1), alpha=st.sampled_from([1.0, 0.5]), beta=st.sampled_from([1.0, -2.0]),
       c_shape=st.sampled_from([None, (), (4,), (1, 4), (3, 1), (3, 4)]), opset=st.sampled_from([11, 13]))
def test_gemm(ta, tb, alpha, beta, c_shape, opset):
    m, k, n = 3, 2, 4
    shapes = {"a": (k, m) if ta else (m, k), "b": (n, k) if tb else (k, n)}
    if c_shape is not None:
        shapes["c"] = c_shape
    feeds = {name: normal(shape, i) for i, (name, shape) in enumerate(shapes.items())}
    for wrt in shapes:
        check(lambda dt: make([node("Gemm", list(shapes), alpha=alpha, beta=beta, transA=ta, transB=tb)],
                              {k_: list(v) for k_, v in shapes.items()}, opset=opset, dtype=dt), feeds, wrt,
              use_ort=True)


MATMUL = [((3,), (3,)), ((3,), (3, 2)), ((2, 3), (3,)), ((2, 3), (3, 4)), ((2, 2, 3), (3, 4)), ((3,), (2, 3, 4)),
          ((2, 1, 2, 3), (3, 3, 2)), ((2, 3, 2), (2,))]


@pytest.mark.parametrize("a_shape, b_shape", MATMUL)
def test_matmul(a_shape, b_shape):
    feeds = {"a": normal(a_shape), "b": normal(b_shape, 1)}
    for wrt in ("a", "b"):
        check(lambda dt: make([node("MatMul", ["a", "b"])], {"a": list(a_shape), "b": list(b_shape)}, dtype=dt),
              feeds, wrt, use_ort=True)


@st.composite
def conv_cases(draw):
    nd = draw(st.integers(1, 2))
    group = draw(st.integers(1, 2))
    cin, cout = group * draw(st.integers(1, 2)), group * draw(st.integers(1, 2))
    k = draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd))
    s = draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd))
    d = draw(st.lists(st.integers(1, 2), min_size=nd, max_size=nd))
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    if auto_pad.startswith("SAME"):  # onnxruntime: "Dilation not supported for AutoPadType::SAME_UPPER"
        d = [1] * nd
    pads = draw(st.lists(st.integers(0, 2), min_size=2 * nd, max_size=2 * nd))
    spatial = [draw(st.integers((kk - 1) * dd + 1, 6)) for kk, dd in zip(k, d)]
    return dict(nd=nd, group=group, cin=cin, cout=cout, k=k, s=s, d=d, auto_pad=auto_pad, pads=pads,
                spatial=spatial, bias=draw(st.booleans()))


@settings(max_examples=50, deadline=None, derandomize=True)
@given(case=conv_cases(), dynamic=st.booleans())
def test_conv(case, dynamic):
    """`dynamic`: spatial sizes declared symbolic, known only at run time."""
    attrs = dict(strides=case["s"], dilations=case["d"], group=case["group"], kernel_shape=case["k"])
    if case["auto_pad"] == "NOTSET":
        attrs["pads"] = case["pads"]
    else:
        attrs["auto_pad"] = case["auto_pad"]
    x_shape = [2, case["cin"], *case["spatial"]]
    w = normal([case["cout"], case["cin"] // case["group"], *case["k"]], 1)
    feeds = {"x": normal(x_shape)}
    inputs = {"x": x_shape[:2] + [f"s{i}" for i in range(case["nd"])] if dynamic else x_shape}
    if case["bias"]:
        feeds["b"], inputs["b"] = normal([case["cout"]], 2), [case["cout"]]

    def build(dt):
        return make([node("Conv", ["x", "w", *(["b"] if case["bias"] else [])], **attrs)], inputs, inits={"w": w},
                    dtype=dt)
    if dynamic and case["auto_pad"].startswith("SAME"):
        with pytest.raises(NotCamCompatible, match="Conv at node 'n_conv_y'.*static spatial sizes"):
            add_backward(build(D), "x", "y")
        return
    for wrt in feeds:
        check(build, feeds, wrt, use_ort=True)


@pytest.mark.parametrize("spatial", [(1, 1), (3, 2), (4,)])
@pytest.mark.parametrize("dynamic", [False, True])
def test_pointwise_conv_is_one_matmul(spatial, dynamic):
    """A 1x1 Conv's input gradient is a MatMul over channels, not a per-image ConvTranspose."""
    x_shape = [3, 4, *spatial]
    w = normal([5, 4, *[1] * len(spatial)], 1)
    inputs = {"x": x_shape[:2] + [f"s{i}" for i in range(len(spatial))] if dynamic else x_shape}

    def build(dt):
        return make([node("Conv", ["x", "w"], kernel_shape=[1] * len(spatial))], inputs, inits={"w": w}, dtype=dt)
    check(build, {"x": normal(x_shape)}, "x", use_ort=True)
    ops = {n.op_type for n in add_backward(build(F), "x", "y").graph.node}
    assert "MatMul" in ops and "ConvTranspose" not in ops


EINSUM = [("ij,jk->ik", [(2, 3), (3, 4)]), ("bij,bjk->bik", [(2, 2, 3), (2, 3, 2)]), ("ij,kj", [(2, 3), (4, 3)]),
          ("ik,k->i", [(3, 2), (2,)]), ("ij->ji", [(2, 3)]), ("ij,jk,kl->il", [(2, 2), (2, 3), (3, 2)]),
          ("nchw,kc->nkhw", [(1, 2, 2, 2), (3, 2)])]


@pytest.mark.parametrize("equation, shapes", EINSUM)
def test_einsum(equation, shapes):
    names = "abc"[:len(shapes)]
    feeds = {n: normal(shape, i) for i, (n, shape) in enumerate(zip(names, shapes))}
    for wrt in names:
        check(lambda dt: make([node("Einsum", names, equation=equation)], {n: list(v.shape) for n, v in feeds.items()},
                              opset=12, dtype=dt), feeds, wrt, use_ort=True)


@pytest.mark.parametrize("equation", ["ii->i", "ij->i", "...ij,...jk->...ik"])
def test_einsum_without_a_rule_is_refused(equation):
    model = make([node("Einsum", ["x"] if equation.count(",") == 0 else ["x", "x"], equation=equation)],
                 {"x": [2, 2]}, opset=12)
    with pytest.raises(NotCamCompatible, match="Einsum at node 'n_einsum_y'"):
        add_backward(model, "x", "y")


@pytest.mark.parametrize("opset", [11, 15])
def test_batch_normalization(opset):
    inits = {"scale": normal(3, 1), "bias": normal(3, 2), "mean": normal(3, 3), "var": np.abs(normal(3, 4)) + 0.1}
    check(lambda dt: make([node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], epsilon=1e-3)],
                          {"x": [2, 3, 2, 2]}, inits=inits, opset=opset, dtype=dt), {"x": normal((2, 3, 2, 2))},
          use_ort=True)


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("axis", [-1, -2, 1])
def test_layer_normalization(axis, opset):
    shape = (2, 3, 4)
    scale_shape = shape[axis:] if axis < 0 else shape[axis:]
    inits = {"scale": normal(scale_shape, 1), "bias": normal(scale_shape, 2)}
    check(lambda dt: make([node("LayerNormalization", ["x", "scale", "bias"], axis=axis, epsilon=1e-3)],
                          {"x": list(shape)}, inits=inits, opset=opset, dtype=dt), {"x": normal(shape)}, use_ort=True)


# ------------------------------------------------------------------ pooling and reductions

@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
def test_global_pool(op):
    check(lambda dt: make([node(op, ["x"])], {"x": [2, 3, 2, 3]}, dtype=dt), {"x": normal((2, 3, 2, 3))},
          use_ort=True)


@st.composite
def pool_cases(draw):
    nd = draw(st.integers(1, 2))
    k = draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd))
    s = draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd))
    pads = [draw(st.integers(0, kk - 1)) for kk in k * 2]  # onnxruntime wants pads < kernel
    spatial = [draw(st.integers(kk, 6)) for kk in k]
    return dict(k=k, s=s, pads=pads, spatial=spatial, ceil_mode=draw(st.integers(0, 1)),
                include_pad=draw(st.integers(0, 1)), opset=draw(st.sampled_from([11, 19])))


@settings(max_examples=50, deadline=None, derandomize=True)
@given(case=pool_cases())
def test_average_pool(case):
    attrs = dict(kernel_shape=case["k"], strides=case["s"], pads=case["pads"], ceil_mode=case["ceil_mode"],
                 count_include_pad=case["include_pad"])
    shape = [2, 2, *case["spatial"]]
    check_ort_forward(lambda dt: make([node("AveragePool", ["x"], **attrs)], {"x": shape}, opset=case["opset"],
                                      dtype=dt),
               normal(shape))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(case=pool_cases(), dilation=st.integers(1, 2))
def test_max_pool(case, dilation):
    k, s = case["k"], case["s"]
    overlap = any(si < (ki - 1) * dilation + 1 for ki, si in zip(k, s))
    opset = 16 if overlap else case["opset"] if case["opset"] < 16 else 18
    attrs = dict(kernel_shape=k, strides=s, pads=case["pads"], ceil_mode=case["ceil_mode"],
                 dilations=[dilation] * len(k))
    shape = [2, 2, *[sp + (kk - 1) * (dilation - 1) for sp, kk in zip(case["spatial"], k)]]
    # Values 0.1 apart: the finite differences (step 0.01) never swap two maxima.
    x = np.random.default_rng(0).permutation(np.prod(shape)).reshape(shape) * 0.1
    check_ort_forward(lambda dt: make([node("MaxPool", ["x"], **attrs)], {"x": shape}, opset=opset, dtype=dt), x,
               float64=False)


def test_three_dimensional_conv_and_average_pool():
    w = normal((2, 2, 2, 1, 3), 1)
    check(lambda dt: make([node("Conv", ["x", "w"], strides=[1, 2, 1], pads=[1, 0, 1, 0, 1, 1], dilations=[1, 1, 2])],
                          {"x": [1, 2, 3, 4, 5]}, inits={"w": w}, dtype=dt), {"x": normal((1, 2, 3, 4, 5))},
          use_ort=True)
    attrs = dict(kernel_shape=[2, 2, 3], strides=[1, 2, 2], pads=[1, 0, 1, 0, 1, 1], count_include_pad=0)
    check_ort_forward(lambda dt: make([node("AveragePool", ["x"], **attrs)], {"x": [1, 2, 3, 4, 5]}, dtype=dt),
                      normal((1, 2, 3, 4, 5)))


@pytest.mark.parametrize("outputs", [("y",), ("y", "indices")])
def test_max_pool_routes_ties_to_the_first_maximum(outputs):
    """As torch: each window's gradient goes to its first maximum; overlapping windows add up.
    A MaxPool that already outputs its Indices lends them."""
    x = np.array([[[[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]]], dtype=np.float32)
    model = make([node("MaxPool", ["x"], outputs, kernel_shape=[2, 2], strides=[1, 1])], {"x": [1, 1, 3, 3]},
                 opset=16, dtype=F)
    session = ort.InferenceSession(checked(add_backward(model, "x", "y")).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    grad = session.run(["cam_grad"], {"x": x, "cam_seed": np.ones((1, 1, 2, 2), np.float32)})[0]
    np.testing.assert_array_equal(grad[0, 0], [[1, 1, 0], [0, 2, 0], [0, 0, 0]])


def test_overlapping_max_pool_before_opset_16_is_refused():
    model = make([node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2])], {"x": [1, 1, 5, 5]}, opset=13)
    with pytest.raises(NotCamCompatible, match="MaxPool at node 'n_maxpool_y'.*overlapping"):
        add_backward(model, "x", "y")


REDUCTIONS = ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceSumSquare",
              "ReduceLogSumExp"]


@pytest.mark.parametrize("op", REDUCTIONS)
@settings(max_examples=8, deadline=None, derandomize=True)
@given(axes=st.lists(st.sampled_from([0, 1, 2, -1]), max_size=2, unique_by=lambda a: a % 3),
       keepdims=st.integers(0, 1), opset=st.sampled_from([11, 13, 18]))
def test_reductions(op, axes, keepdims, opset):
    limit = 13 if op == "ReduceSum" else 18
    inputs, attrs, inits = _axes("axes", axes, opset, limit) if axes else ([], {}, {})
    check(lambda dt: make([node(op, ["x", *inputs], keepdims=keepdims, **attrs)], {"x": [2, 3, 2]}, inits=inits,
                          opset=opset, dtype=dt), {"x": normal((2, 3, 2))}, use_ort=True)


@pytest.mark.parametrize("op", ["ReduceMax", "GlobalMaxPool"])
def test_max_reductions_split_ties_evenly(op):
    """As torch.amax: the tied maxima share the gradient."""
    attrs = {"axes": [2, 3], "keepdims": 1} if op == "ReduceMax" else {}
    model = make([node(op, ["x"], **attrs)], {"x": [1, 1, 2, 2]}, opset=13)
    x = np.array([[[[3.0, 1.0], [3.0, 3.0]]]])
    feeds = {"x": x, "cam_seed": np.full((1, 1, 1, 1), 6.0)}
    grad = evaluator(checked(add_backward(model, "x", "y"))).run(["cam_grad"], feeds)[0]
    np.testing.assert_allclose(grad[0, 0], [[2, 0], [2, 2]])


# ------------------------------------------------------------------ graphs with several paths

def test_residual_add():
    w = normal((2, 2, 3, 3), 1)
    nodes = [node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), node("Relu", ["c"], ["r"]), node("Add", ["x", "r"])]
    check(lambda dt: make(nodes, {"x": [1, 2, 3, 3]}, inits={"w": w}, dtype=dt), {"x": normal((1, 2, 3, 3))},
          use_ort=True)


def test_squeeze_excitation_product():
    """x * Sigmoid(Conv1x1(GlobalAveragePool(x))): both factors depend on x."""
    nodes = [node("GlobalAveragePool", ["x"], ["p"]), node("Conv", ["p", "w", "b"], ["c"]),
             node("HardSigmoid", ["c"], ["s"], alpha=1 / 6), node("Mul", ["x", "s"])]
    inits = {"w": normal((3, 3, 1, 1), 1), "b": normal(3, 2)}
    check(lambda dt: make(nodes, {"x": [2, 3, 2, 2]}, inits=inits, opset=14, dtype=dt), {"x": normal((2, 3, 2, 2))},
          use_ort=True)


def test_tensor_read_three_times():
    nodes = [node("Mul", ["x", "x"], ["sq"]), node("Tanh", ["x"], ["t"]), node("Add", ["sq", "t"])]
    check(lambda dt: make(nodes, {"x": [2, 3]}, dtype=dt), {"x": normal((2, 3))}, use_ort=True)


def test_gradient_with_respect_to_an_internal_tensor():
    nodes = [node("Exp", ["x"], ["e"]), node("Sigmoid", ["e"], ["s"]), node("Mul", ["s", "e"])]
    model = make(nodes, {"x": [2, 3]})
    back = add_backward(model, "e", "y", grad="g_e")
    onnx.checker.check_model(back, full_check=True)
    x, seed = normal((2, 3)), normal((2, 3), 1)
    got = evaluator(back).run(["g_e"], {"x": x, "cam_seed": seed})[0]
    e = np.exp(x)
    s = 1 / (1 + np.exp(-e))
    np.testing.assert_allclose(got, seed * (s * (1 - s) * e + s), rtol=1e-12)


def test_output_not_depending_on_wrt_is_refused():
    model = make([node("Relu", ["a"], ["y"])], {"a": [2], "b": [2]})
    with pytest.raises(NotCamCompatible, match="'y' does not depend on 'b'"):
        add_backward(model, "b", "y")


def test_op_without_rule_is_refused_naming_op_and_node():
    model = make([node("Relu", ["x"], ["r"]), helper.make_node("Cos", ["r"], ["y"], name="the_cos")], {"x": [2]})
    with pytest.raises(NotCamCompatible, match=r"^no gradient rule for Cos at node 'the_cos'$"):
        add_backward(model, "x", "y")


def test_a_model_must_be_a_model_proto():
    with pytest.raises(InvalidInput, match="model must be an onnx.ModelProto, got str"):
        add_backward("model.onnx", "x", "y")


def test_opset_below_11_is_refused():
    model = make([node("Relu", ["x"])], {"x": [2]}, opset=10)
    with pytest.raises(NotCamCompatible, match="opset >= 11; the model has opset 10"):
        add_backward(model, "x", "y")
    with pytest.raises(NotCamCompatible, match="opset >= 11"):
        cut_head(model, "x", "y")


def test_constant_and_shape_subgraphs_need_no_rules():
    """Shape -> Gather -> Concat -> Reshape and ConstantOfShape hang off x without gradients."""
    nodes = [node("Shape", ["x"], ["shape"]), node("Gather", ["shape", "zero"], ["n"], axis=0),
             node("Concat", ["n", "minus_one"], ["target_shape"], axis=0),
             node("ConstantOfShape", ["shape"], ["ones"], value=numpy_helper.from_array(np.ones(1))),
             node("Add", ["x", "ones"], ["xo"]), node("Reshape", ["xo", "target_shape"])]
    inits = {"zero": np.array([0], dtype=np.int64), "minus_one": np.array([-1], dtype=np.int64)}
    check(lambda dt: make(nodes, {"x": [2, 3, 2]}, inits=inits, dtype=dt), {"x": normal((2, 3, 2))})


@pytest.mark.parametrize("opset", [11, 13])
def test_paddle_style_head_with_unknown_dims(opset):
    """paddle2onnx: -1 dims, Reshape to Concat(Shape(x)[0], -1), MatMul + Add.  onnx shape
    inference loses the ranks after the Reshape; they are recovered from the ops."""
    un_in, un_attr, un_init = _axes("un", [0], opset, 13)
    nodes = [node("GlobalAveragePool", ["x"], ["p"]), node("Shape", ["p"], ["shape"]),
             node("Gather", ["shape", "zero"], ["n"], axis=0), node("Unsqueeze", ["n", *un_in], ["n1"], **un_attr),
             node("Concat", ["n1", "minus_one"], ["flat_shape"], axis=0), node("Reshape", ["p", "flat_shape"], ["f"]),
             node("MatMul", ["f", "w"], ["m"]), node("Add", ["m", "b"])]
    inits = {"zero": np.array(0), "minus_one": np.array([-1]), "w": normal((3, 4), 1), "b": normal(4, 2), **un_init}
    check(lambda dt: make(nodes, {"x": [-1, 3, -1, -1]}, inits=inits, opset=opset, dtype=dt, out_rank=2),
          {"x": normal((2, 3, 2, 3))}, use_ort=True)


# ------------------------------------------------------------------ cut_head and realistic heads

def _backbone_with_skip(dtype=D):
    """image -> Conv -> feat (target); skip = Conv(image) bypasses it; a reshape reads the image's batch size."""
    nodes = [node("Conv", ["image", "w1"], ["feat"], pads=[1, 1, 1, 1]), node("Relu", ["feat"], ["r"]),
             node("Conv", ["image", "w2"], ["skip"]), node("Add", ["r", "skip"], ["sum"]),
             node("GlobalAveragePool", ["sum"], ["pooled"]), node("Shape", ["image"], ["image_shape"]),
             node("Gather", ["image_shape", "zero"], ["n"], axis=0),
             node("Concat", ["n", "minus_one"], ["flat_shape"], axis=0),
             node("Reshape", ["pooled", "flat_shape"], ["flat"]), node("Gemm", ["flat", "fc"], ["logits"], transB=1),
             node("Softmax", ["logits"], ["probs"], axis=1)]
    inits = {"w1": normal((4, 2, 3, 3), 1), "w2": normal((4, 2, 1, 1), 2), "fc": normal((3, 4), 3),
             "zero": np.array([0], dtype=np.int64), "minus_one": np.array([-1], dtype=np.int64)}
    return make(nodes, {"image": [1, 2, 4, 4]}, inits=inits, dtype=dtype, out="probs")


def test_cut_head_frontier():
    model = _backbone_with_skip()
    before = model.SerializeToString()
    head, frontier = cut_head(model, "feat", "logits")
    assert model.SerializeToString() == before
    onnx.checker.check_model(head, full_check=True)
    assert frontier == ["image", "skip"]
    assert [i.name for i in head.graph.input] == ["feat", "image", "skip"]
    assert [o.name for o in head.graph.output] == ["logits"]
    assert {n.op_type for n in head.graph.node} == {"Relu", "Add", "GlobalAveragePool", "Shape", "Gather", "Concat",
                                                    "Reshape", "Gemm"}
    # The head reproduces the model's logits from its features, with a batch of 3 rows.
    image = normal((1, 2, 4, 4))
    inferred = onnx.shape_inference.infer_shapes(model)
    full = evaluator(onnx.utils.Extractor(inferred).extract_model(["image"], ["feat", "skip", "logits"]))
    feat, skip, logits = full.run(None, {"image": image})
    feeds = {"feat": np.repeat(feat, 3, 0), "image": np.zeros((3, 1, 1, 1)), "skip": np.repeat(skip, 3, 0)}
    np.testing.assert_allclose(evaluator(head).run(None, feeds)[0], np.repeat(logits, 3, 0), rtol=1e-12)
    assert cut_head(model, "feat", "logits")[0].SerializeToString() == head.SerializeToString()


def test_cut_head_gradient_matches_finite_differences():
    head, _ = cut_head(_backbone_with_skip(), "feat", "logits")
    feeds = {"feat": normal((2, 4, 4, 4)), "image": np.zeros((2, 1, 1, 1)), "skip": normal((2, 4, 4, 4), 1)}
    check(lambda dt: head, feeds, "feat", of="logits")


def test_cut_head_refuses_logits_independent_of_target():
    with pytest.raises(NotCamCompatible, match="logits 'feat' do not depend on target 'skip'"):
        cut_head(_backbone_with_skip(), "skip", "feat")


def _mobilenet_v3_head(dtype):
    nodes = [node("Conv", ["feat", "w1"], ["c1"]),
             node("BatchNormalization", ["c1", "s", "b", "m", "v"], ["bn"]), node("HardSwish", ["bn"], ["h1"]),
             node("GlobalAveragePool", ["h1"], ["p"]), node("Conv", ["p", "w2", "b2"], ["c2"]),
             node("HardSwish", ["c2"], ["h2"]), node("Flatten", ["h2"], ["f"]),
             node("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1)]
    inits = {"w1": normal((6, 4, 1, 1), 1), "s": normal(6, 2), "b": normal(6, 3), "m": normal(6, 4),
             "v": np.abs(normal(6, 5)) + 0.5, "w2": normal((5, 6, 1, 1), 6), "b2": normal(5, 7),
             "fc": normal((3, 5), 8), "fcb": normal(3, 9)}
    return make(nodes, {"feat": [1, 4, 3, 3]}, inits=inits, opset=14, dtype=dtype, out="logits")


def _convnext_head(dtype):
    nodes = [node("GlobalAveragePool", ["feat"], ["p"]), node("Transpose", ["p"], ["t"], perm=[0, 2, 3, 1]),
             node("LayerNormalization", ["t", "s", "b"], ["ln"], axis=-1, epsilon=1e-6),
             node("Flatten", ["ln"], ["f"]), node("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1)]
    inits = {"s": normal(4, 1), "b": normal(4, 2), "fc": normal((3, 4), 3), "fcb": normal(3, 4)}
    return make(nodes, {"feat": [1, 4, 3, 3]}, inits=inits, opset=17, dtype=dtype, out="logits")


def _vgg_head(dtype):
    nodes = [node("MaxPool", ["feat"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]), node("Flatten", ["mp"], ["f"]),
             node("Gemm", ["f", "fc1", "b1"], ["h"], transB=1), node("Relu", ["h"], ["r"]),
             node("Dropout", ["r"], ["dr"]), node("Gemm", ["dr", "fc2", "b2"], ["logits"], transB=1)]
    inits = {"fc1": normal((6, 4 * 2 * 2), 1), "b1": normal(6, 2), "fc2": normal((3, 6), 3), "b2": normal(3, 4)}
    return make(nodes, {"feat": [1, 4, 4, 4]}, inits=inits, opset=13, dtype=dtype, out="logits")


@pytest.mark.parametrize("build", [_mobilenet_v3_head, _convnext_head, _vgg_head])
def test_realistic_heads_one_class_at_a_time(build):
    """Gradient of logits[c] w.r.t. the feature map, for each class c."""
    model = build(D)
    grad_model = gradient_model(model, "feat", "logits")
    onnx.checker.check_model(grad_model, full_check=True)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    feat = normal(shape, 11)
    forward = evaluator(model)
    session = ort.InferenceSession(gradient_model(build(F), "feat", "logits").SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    for c in range(3):
        seed = np.eye(3)[[c]]
        logits, grad = evaluator(grad_model).run(None, {"feat": feat, "cam_seed": seed})
        np.testing.assert_allclose(logits, forward.run(None, {"feat": feat})[0])
        expected = finite_differences(lambda f: forward.run(None, f)[0], {"feat": feat}, "feat", seed)
        np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7 * max(1, np.abs(expected).max()))
        grad32 = session.run(["cam_grad"], {"feat": feat.astype(np.float32), "cam_seed": seed.astype(np.float32)})[0]
        np.testing.assert_allclose(grad32, grad, rtol=1e-3, atol=1e-4 * max(1, np.abs(grad).max()))


def test_cut_head_writes_pooled_pointwise_convs_as_gemm():
    """The conv after the pooling (1x1 map) becomes Flatten + Gemm; the one before it stays a Conv."""
    model = _mobilenet_v3_head(F)
    head, _ = cut_head(model, "feat", "logits")
    ops = [n.op_type for n in head.graph.node]
    assert ops.count("Conv") == 1 and ops.count("Gemm") == 2
    assert all(n.name.startswith("cam_") for n in head.graph.node if n.op_type in ("Gemm", "Reshape") and
               n.output[0] != "logits")
    feat = normal((3, 4, 3, 3), 13).astype(np.float32)
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    cut = ort.InferenceSession(head.SerializeToString(), providers=["CPUExecutionProvider"])
    for row in feat:  # the model was declared at batch 1
        np.testing.assert_allclose(cut.run(None, {"feat": row[None]})[0], original.run(None, {"feat": row[None]})[0],
                                   rtol=1e-5, atol=1e-6)


def test_top_k_classes_in_one_batched_run():
    """Features repeated k times with one-hot seeds give each class's gradient in one head run."""
    grad_model = checked(gradient_model(_mobilenet_v3_head(D), "feat", "logits"))
    run = evaluator(grad_model)
    feats, classes = normal((2, 4, 3, 3), 12), np.array([[2, 0], [1, 2]])  # (N, k)
    batch = np.repeat(feats, 2, axis=0)
    seeds = np.eye(3)[classes.reshape(-1)]
    _, grads = run.run(None, {"feat": batch, "cam_seed": seeds})
    for i, j in np.ndindex(classes.shape):
        single = run.run(None, {"feat": feats[[i]], "cam_seed": np.eye(3)[[classes[i, j]]]})[1]
        np.testing.assert_allclose(grads[[i * 2 + j]], single, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ real exports

def to_double(model):
    """A float32/float16 model recomputed in float64 (initializers, Constants, Casts, types)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    floats = (F, TensorProto.FLOAT16)
    for i, t in enumerate(out.graph.initializer):
        if t.data_type in floats:
            value = numpy_helper.to_array(t).astype(np.float64)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, t.name))
    for vi in [*out.graph.input, *out.graph.output, *out.graph.value_info]:
        if vi.type.tensor_type.elem_type in floats:
            vi.type.tensor_type.elem_type = D
    for n in out.graph.node:
        for a in n.attribute:
            if a.name == "to" and a.i in floats:
                a.i = D
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in floats:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
    return out


# Targets six nodes before the feature map: the torchscript export pads the depthwise Conv's
# input with pads computed in the graph and reshapes by the image's batch size (Shape).
REAL_TARGETS = {"torchscript": "/_blocks.15/_swish/Clip_output_0", "dynamo": "hardtanh_30"}


@pytest.mark.parametrize("name", sorted(REAL_TARGETS))
def test_real_exports(name):
    """EfficientNet-Lite0 from both torch exporters: head from a block-15 tensor to the logits,
    onnxruntime float32 against the float64 gradient and its directional derivatives."""
    from pathlib import Path

    from backends.onnx_graph import expose_outputs, find_head
    from camcore import default_model

    path = {"torchscript": default_model.path(),
            "dynamo": Path(__file__).parent / "models" / "efficientnet_lite0_dynamo.onnx"}[name]
    model = onnx.load(path)
    target, logits = REAL_TARGETS[name], find_head(model).logits
    image = dict(np.load(Path(__file__).parent / "models" / "lite0_reference.npz"))["inputs"][:1]
    backbone = ort.InferenceSession(expose_outputs(model, [target]).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
    feature, full_logits = backbone.run([target, logits], {backbone.get_inputs()[0].name: image})
    head_model, frontier = cut_head(model, target, logits)
    assert frontier == (["input"] if name == "torchscript" else [])
    grad_model = gradient_model(model, target, logits)
    onnx.checker.check_model(grad_model, full_check=True)
    feeds = {target: feature, **{f: np.zeros((1, 1, 1, 1), np.float32) for f in frontier}}
    session = ort.InferenceSession(grad_model.SerializeToString(), providers=["CPUExecutionProvider"])
    top = session.run(None, {**feeds, "cam_seed": np.zeros((1, 1000), np.float32)})[0].argmax()
    seed = np.eye(1000)[[top]]
    grad32 = session.run(["cam_grad"], {**feeds, "cam_seed": seed.astype(np.float32)})[0]

    double = evaluator(to_double(grad_model))
    feeds64 = {k: v.astype(np.float64) for k, v in feeds.items()}
    logit, grad = double.run(None, {**feeds64, "cam_seed": seed})
    np.testing.assert_allclose(grad32, grad, rtol=1e-3, atol=1e-4 * np.abs(grad).max())
    rng = np.random.default_rng(0)
    for _ in range(2):
        v, eps = rng.standard_normal(feature.shape), 1e-6
        plus = double.run(None, {**feeds64, target: feeds64[target] + eps * v, "cam_seed": seed})[0][0, top]
        minus = double.run(None, {**feeds64, target: feeds64[target] - eps * v, "cam_seed": seed})[0][0, top]
        np.testing.assert_allclose((plus - minus) / (2 * eps), np.sum(grad * v), rtol=1e-5)
    np.testing.assert_allclose(logit, full_logits, atol=1e-3)  # the head reproduces the model
