"""backends/ layout: proto helpers once, session names kept, gradient rules merged from their family
tables (the import rules are tests/test_layers.py's)."""

from __future__ import annotations

import ast

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends import _proto, backprop
from backends.backprop import _graph, activation, arithmetic, linear, normalization, pooling, quantization, shape
from camcore.errors import CamError, NotCamCompatible

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ROOT / "backends"


def test_session_names_stay_importable_from_ort_session():
    from backends import ort_runtime, ort_session

    for name in ("import_onnxruntime", "make_session", "resolve_providers", "provider_name"):
        assert getattr(ort_session, name) is getattr(ort_runtime, name)


@pytest.mark.parametrize("helper_name", ["_attr", "_dims", "_node_label", "_opset"])
def test_proto_helpers_exist_once(helper_name):
    defined = [p.name for p in BACKENDS.rglob("*.py")
               if any(isinstance(n, ast.FunctionDef) and n.name == helper_name
                      for n in ast.walk(ast.parse(p.read_text())))]
    assert defined == []


def test_rules_are_the_union_of_the_families():
    families = (shape, arithmetic, activation, linear, normalization, pooling, quantization)
    ops = [op for f in families for op in f.RULES]
    assert len(ops) == len(set(ops)) == len(backprop.RULES) == 71
    assert all(backprop.RULES[op] is f.RULES[op] for f in families for op in f.RULES)


def test_merge_rules_refuses_an_op_defined_twice():
    with pytest.raises(RuntimeError, match="'Relu' defined twice"):
        backprop.merge_rules([activation, activation])
    assert backprop.merge_rules([normalization]) == normalization.RULES


@pytest.mark.parametrize("declared, expected", [
    ([2, 3], (2, 3)), ([-1, 3], (None, 3)), ([0, "n"], (None, "n")), ([None, 4], (None, 4)), ([], ()),
])
def test_dims_reads_non_positive_sizes_as_dynamic(declared, expected):
    assert _proto.dims(helper.make_tensor_type_proto(TensorProto.FLOAT, declared)) == expected


def test_dims_of_an_unknown_rank_is_none():
    assert _proto.dims(helper.make_tensor_type_proto(TensorProto.FLOAT, None)) is None


def test_gradient_index_keeps_a_real_empty_axis():
    """A declared -1 is dynamic, an empty initializer keeps its 0."""
    empty = numpy_helper.from_array(np.zeros((0,), np.float32), "empty")
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3])], [empty])
    ix = _graph._Index(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert ix.dims("x") == (None, 3)
    assert ix.dims("empty") == (0,)


def test_opset_raises_the_callers_error_class():
    model = helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("custom", 1)])
    with pytest.raises(NotCamCompatible, match="no default-domain"):
        _proto.opset(model)
    with pytest.raises(CamError, match="no default-domain") as info:
        _proto.opset(model, error=CamError)
    assert type(info.value) is CamError


def test_node_label_names_op_and_node():
    assert _proto.node_label(helper.make_node("Relu", ["x"], ["y"], name="act")) == "Relu at node 'act'"
    assert _proto.node_label(helper.make_node("Relu", ["x"], ["y"])) == "Relu at node 'y'"


def test_missing_rule_names_op_and_node():
    graph = helper.make_graph([helper.make_node("Sin", ["x"], ["y"], name="wave")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    with pytest.raises(NotCamCompatible, match="no gradient rule for Sin at node 'wave'"):
        backprop.add_backward(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "x", "y")


def test_copy_model_returns_a_copy():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    out = _proto.copy_model(model, nodes=[helper.make_node("Neg", ["x"], ["y"])])
    assert [n.op_type for n in out.graph.node] == ["Neg"] and [n.op_type for n in model.graph.node] == ["Relu"]
    assert isinstance(out, onnx.ModelProto)
