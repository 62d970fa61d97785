"""The method registry: every method has a spec, and the Explainer runs only what a spec needs."""

import ast
from pathlib import Path

import numpy as np
import pytest

import camcore.explainer as explainer_module
from camcore import InvalidInput, NotCamCompatible, perturbation
from camcore.methods import (GRADIENT_METHODS, METHODS, NEEDS, REGISTRY, MethodSpec, eigencam, gradcam,
                             method_options)
from camcore.methods._registry import merge
from tests.test_explainer import make


class CountingBackend:
    """Wraps the fake backend, counting head runs with and without gradient seeds."""

    def __init__(self, inner):
        self.inner, self.head = inner, inner.head
        self.forward_runs = self.gradient_runs = 0

    def run(self, inputs):
        return self.inner.run(inputs)

    def run_head(self, features, seeds=None):
        if seeds is None:
            self.forward_runs += 1
        else:
            self.gradient_runs += 1
        return self.inner.run_head(features, seeds)


def counting(**kwargs):
    ex, rng = make(**kwargs)
    ex.backend = CountingBackend(ex.backend)
    return ex, rng


def test_every_method_is_registered_in_order():
    assert METHODS == ("auto", *REGISTRY)
    assert METHODS == ("auto", "cam", *GRADIENT_METHODS, "eigencam", *perturbation.FORWARD_METHODS, "rollout", "gae")
    for name, spec in REGISTRY.items():
        assert spec.name == name and spec.needs <= NEEDS
        assert ("features" in spec.needs) != ("attention" in spec.needs)
    assert all(REGISTRY[name].needs == {"features", "gradients"} and REGISTRY[name].function is function
               for name, function in GRADIENT_METHODS.items())
    assert REGISTRY["cam"].needs == {"weights", "features"}
    assert REGISTRY["eigencam"].function is eigencam and not REGISTRY["eigencam"].class_specific
    assert REGISTRY["ablationcam"].function is perturbation.ablationcam
    assert REGISTRY["reciprocam"].needs == REGISTRY["ablationcam"].needs == {"features", "head_runs"}
    assert REGISTRY["scorecam"].needs == {"features", "model_runs"}
    assert method_options() == ("batch_size", "mask", "mask_at", "max_channels", "scoring")


def test_merge_refuses_a_name_twice_and_specs_an_unknown_need():
    spec = MethodSpec("x", {"features"}, gradcam, lambda given: None)
    assert spec.needs == frozenset({"features"})
    with pytest.raises(InvalidInput, match="'x' is registered twice"):
        merge((spec,), (spec,))
    with pytest.raises(InvalidInput, match="needs \\['logits'\\]"):
        MethodSpec("y", {"features", "logits"}, gradcam, lambda given: None)


@pytest.mark.parametrize("method, forward_runs, gradient_runs", [
    ("cam", 0, 0), ("eigencam", 0, 0), ("gradcam", 0, 1), ("layercam", 0, 1), ("ablationcam", 1, 0),
    ("reciprocam", 1, 0), ("scorecam", 0, 0)])
def test_explainer_runs_only_what_the_spec_needs(method, forward_runs, gradient_runs):
    ex, rng = counting()
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    out = ex.explain(x, top_k=2, method=method)
    assert out.method == method and out.maps.shape == (2, 2, 8, 8)
    assert (ex.backend.forward_runs, ex.backend.gradient_runs) == (forward_runs, gradient_runs)


def test_a_new_method_is_one_registration(monkeypatch):
    """A method the Explainer has never heard of runs through the registry, with what it needs."""
    seen = {}

    def logit_cam(given):  # each class's logit, as a flat map
        seen.update(given=given)
        logits = np.take_along_axis(given.run_head(given.features), given.classes, axis=1)
        return np.broadcast_to(logits[:, :, None, None], (*given.classes.shape, 8, 8))

    spec = MethodSpec("logitcam", {"features", "head_runs"}, logit_cam, logit_cam, options=("batch_size",))
    monkeypatch.setattr(explainer_module, "REGISTRY", {**REGISTRY, "logitcam": spec})
    monkeypatch.setattr(explainer_module, "METHODS", (*METHODS, "logitcam"))
    ex, rng = counting(method_options={"batch_size": 5})
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    out = ex.explain(x, classes=[1, 0], method="logitcam")
    given = seen["given"]
    assert out.maps.shape == (3, 2, 8, 8) and out.maps.dtype == np.float32
    np.testing.assert_allclose(out.maps[..., 3, 5], np.take_along_axis(out.logits, out.classes, 1), rtol=1e-6)
    assert given.gradients is None and given.weights is None and given.run_model is None
    assert given.options == {"batch_size": 5} and given.layout == "NCHW" and given.scoring == "softmax"
    np.testing.assert_array_equal(given.classes, [[1, 0]] * 3)
    assert ex.backend.forward_runs == 1 and ex.backend.gradient_runs == 0


def test_needs_the_explainer_cannot_give_are_refused(monkeypatch):
    spec = MethodSpec("attn", {"features", "attention"}, gradcam, lambda given: None)
    monkeypatch.setattr(explainer_module, "REGISTRY", {**REGISTRY, "attn": spec})
    monkeypatch.setattr(explainer_module, "METHODS", (*METHODS, "attn"))
    ex, rng = make()
    with pytest.raises(NotCamCompatible, match="attn needs attention maps of a vision transformer, and this backend does not give them; the feature methods apply"):
        ex.explain(rng.standard_normal((1, 3, 8, 8)).astype(np.float32), method="attn")


def test_a_method_needing_weights_is_refused_without_an_affine_head(monkeypatch):
    spec = MethodSpec("wcam", {"features", "weights"}, gradcam, lambda given: None)
    monkeypatch.setattr(explainer_module, "REGISTRY", {**REGISTRY, "wcam": spec})
    monkeypatch.setattr(explainer_module, "METHODS", (*METHODS, "wcam"))
    ex, _ = make()
    ex.backend.head = ex.backend.head.__class__(**{**ex.backend.head.__dict__, "weights": None, "bias": None,
                                                     "cam_refusal": "no affine head here"})
    with pytest.raises(NotCamCompatible, match="no affine head here"):
        ex.resolve_method("wcam")
    assert ex.resolve_method("auto") == "gradcam"


def test_model_runs_need_the_inputs():
    ex, rng = make()
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    features, _ = ex.forward({"x": x})
    with pytest.raises(InvalidInput, match="scorecam re-runs the model: maps\\(\\) needs the `inputs`"):
        ex.maps(features, np.zeros((2, 1), np.int64), method="scorecam")
    maps = ex.maps(features, np.zeros((2, 1), np.int64), method="scorecam", inputs={"x": x})
    np.testing.assert_array_equal(maps, ex.explain(x, classes=[0], method="scorecam").maps)


ROOT = Path(__file__).resolve().parents[1]
_CORE = {"errors", "_validate", "backend", "maps", "localize", "render", "preprocess", "metrics", "wsol",
         "faithfulness", "default_model", "scores"}


def _camcore_imports(path):
    """The camcore modules `path` imports, at module level or inside functions, as top-level names."""
    package = ["camcore", *path.parent.relative_to(ROOT / "camcore").parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            parts = base + (node.module.split(".") if node.module else [])
            names = [parts + [alias.name] for alias in node.names] if len(parts) == 1 else [parts]
            found.update(p[1] for p in names if p[0] == "camcore" and len(p) > 1)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("camcore."))
    return found


def test_methods_and_scores_import_only_the_array_core():
    """Array core <- methods: the methods and the core modules this split touched never import the application."""
    methods = sorted((ROOT / "camcore" / "methods").glob("*.py"))
    assert len(methods) >= 6
    for path in methods:
        assert _camcore_imports(path) <= _CORE | {"methods"}, path.name
    for name in ("scores", "faithfulness", "maps"):
        assert _camcore_imports(ROOT / "camcore" / f"{name}.py") <= _CORE - {"faithfulness"}, name
    assert _camcore_imports(ROOT / "camcore" / "perturbation.py") == {"methods"}
    assert "explainer" in _camcore_imports(ROOT / "camcore" / "api.py")  # the walker sees relative imports
