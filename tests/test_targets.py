"""camcore.targets: class names, targets files, multi-label, negated logits, contrast (FinerCAM)."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import camcore
from camcore import InvalidInput
from camcore.methods import GRADIENT_METHODS
from camcore.targets import NEGATIVE, Targets, class_indices, finer_references, read_targets
from tests.test_explainer import make

NAMES = ["tabby", "tiger cat", "Persian", "lynx"]


# ----------------------------------------------------------------- tiny ONNX models

def tiny_model(num_classes=4, *, hidden=0, sigmoid=False, seed=0):
    """Conv 3->6 + Relu, GAP, then Gemm (or Gemm, Relu, Gemm with `hidden`), optionally Sigmoid.

    Returns the model and its parameters (conv weights, head weights, bias).
    """
    rng = np.random.default_rng(seed)
    conv = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    init = [numpy_helper.from_array(conv, "conv_w")]
    nodes = [helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["f"]),
             helper.make_node("GlobalAveragePool", ["f"], ["p"]),
             helper.make_node("Flatten", ["p"], ["v"])]
    if hidden:
        w1 = rng.standard_normal((hidden, 6)).astype(np.float32)
        w2 = rng.standard_normal((num_classes, hidden)).astype(np.float32)
        init += [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.zeros(hidden, np.float32), "b1"),
                 numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.zeros(num_classes, np.float32), "b2")]
        nodes += [helper.make_node("Gemm", ["v", "w1", "b1"], ["h"], transB=1),
                  helper.make_node("Relu", ["h"], ["hr"]),
                  helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"], transB=1)]
        weights, bias = None, None
    else:
        weights = rng.standard_normal((num_classes, 6)).astype(np.float32)
        bias = rng.standard_normal(num_classes).astype(np.float32)
        init += [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")]
        nodes.append(helper.make_node("Gemm", ["v", "w", "b"], ["logits"], transB=1))
    out = "logits"
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["logits"], ["prob"]))
        out = "prob"
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", num_classes])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, weights, bias


def inputs(n=3, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


# ----------------------------------------------------------------- names

def test_class_indices_names_and_indices():
    assert class_indices(["tabby", 3, "2"], class_names=NAMES, num_classes=4) == [0, 3, 2]
    assert class_indices("tiger cat,persian", class_names=NAMES) == [1, 2]
    assert class_indices("negative", num_classes=1) == [NEGATIVE]


@pytest.mark.parametrize("spec, message", [
    ("zebra", "unknown class 'zebra'"),
    ("7", "out of range"),
    (["tabby", "Zebra"], "unknown class 'Zebra'"),
    ("", "no class given"),
])
def test_class_indices_errors(spec, message):
    with pytest.raises(InvalidInput, match=message) as info:
        class_indices(spec, class_names=NAMES, num_classes=4)
    assert "\n" not in str(info.value)


def test_unknown_name_without_class_names_says_so():
    with pytest.raises(InvalidInput, match="no class names"):
        class_indices("cat", num_classes=4)


# ----------------------------------------------------------------- files

def _images(tmp_path, names):
    paths = []
    for name in names:
        path = tmp_path / "photos" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
        paths.append(path)
    return paths


def test_read_targets_csv_header_names_paths_and_multiple_classes(tmp_path):
    paths = _images(tmp_path, ["a.png", "b.png", "sub/c.png"])
    (tmp_path / "labels.csv").write_text("filename,split,label\n"
                                         "photos/a.png,train,tabby\n"  # relative to the file's folder
                                         "b.png,val,3;Persian\n"       # a bare file name
                                         "sub/c.png,val,1\n"           # relative to a root
                                         "sub/c.png,val,lynx\n"        # a second row adds a class
                                         "other.png,val,0\n")          # names no image: ignored
    rows = read_targets(tmp_path / "labels.csv", [str(p) for p in paths], class_names=NAMES, num_classes=4,
                        roots=[tmp_path / "photos"])
    assert rows == [[0], [3, 2], [1, 3]]


def test_read_targets_csv_without_header_and_json(tmp_path):
    paths = [str(p) for p in _images(tmp_path, ["a.png", "b.png"])]
    (tmp_path / "t.csv").write_text(f"{paths[0]},2\n{paths[1]},tabby\n")
    assert read_targets(tmp_path / "t.csv", paths, class_names=NAMES) == [[2], [0]]
    (tmp_path / "t.json").write_text(json.dumps({"a.png": "lynx", "b.png": [1, "Persian"]}))
    assert read_targets(tmp_path / "t.json", paths, class_names=NAMES) == [[3], [1, 2]]
    (tmp_path / "l.json").write_text(json.dumps([{"image": "a.png", "label": 1}, {"path": "b.png", "classes": [0]}]))
    assert read_targets(tmp_path / "l.json", paths, class_names=NAMES) == [[1], [0]]


@pytest.mark.parametrize("name, text, message", [
    ("t.csv", "a.png,0\nb.png\n", r"t.csv line 2: expected IMAGE,CLASS, got 'b.png'"),
    ("t.csv", "a.png,0\nb.png,zebra\n", r"t.csv line 2: unknown class 'zebra'"),
    ("t.csv", "a.png,0\n", r"image .*b.png has no entry in targets file"),
    ("t.csv", "a.png,0,1\nb.png,1\n", r"line 1: expected IMAGE,CLASS"),
    ("t.json", '{"a.png": 0, "b.png": {"x": 1}}', r"entry 'b.png': expected a class"),
    ("t.json", '{"a.png": 0, ', r"not valid JSON"),
    ("t.json", '[{"image": "a.png", "label": 0}, 3]', r"item 1: expected an object"),
    ("t.csv", "", r"has no IMAGE,CLASS rows"),
])
def test_read_targets_errors_name_the_entry(tmp_path, name, text, message):
    paths = [str(p) for p in _images(tmp_path, ["a.png", "b.png"])]
    (tmp_path / name).write_text(text)
    with pytest.raises(InvalidInput, match=message) as info:
        read_targets(tmp_path / name, paths, class_names=NAMES, num_classes=4)
    assert "\n" not in str(info.value)


def test_ambiguous_file_name_is_refused(tmp_path):
    paths = [str(p) for p in _images(tmp_path, ["x/a.png", "y/a.png"])]
    (tmp_path / "t.csv").write_text("a.png,0\n")
    with pytest.raises(InvalidInput, match="names 2 images"):
        read_targets(tmp_path / "t.csv", paths)


def test_missing_targets_file():
    with pytest.raises(InvalidInput, match="cannot read targets file"):
        read_targets("/nonexistent/labels.csv", ["a.png"])


def test_targets_from_file_give_the_same_maps_as_classes(tmp_path):
    explainer, rng = make(k=3, c=4)
    images = [rng.integers(0, 255, (8, 8), np.uint8) for _ in range(5)]
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"im{i}.png"))
        Image.fromarray(image).save(paths[-1])
    per_image = [[2], [0, 3], [1], [3, 1], [0]]
    (tmp_path / "t.csv").write_text("".join(f"im{i}.png,{';'.join(map(str, c))}\n" for i, c in enumerate(per_image)))
    rows = read_targets(tmp_path / "t.csv", paths)
    assert rows == per_image
    got = explainer.explain_images(paths, classes=Targets(rows), batch_size=2)
    for result, classes in zip(got, per_image):
        [want] = explainer.explain_images([result.source], classes=classes)
        np.testing.assert_array_equal(result.classes, classes)
        np.testing.assert_array_equal(result.cams, want.cams)
        np.testing.assert_array_equal(result.scores, want.scores)
        assert [result.box(j) for j in range(len(classes))] == [want.box(j) for j in range(len(classes))]


# ----------------------------------------------------------------- selection

@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 31), st.floats(0.05, 0.95))
def test_multilabel_picks_exactly_the_classes_above_the_threshold(seed, threshold):
    explainer, rng = make(k=3, c=6, seed=seed % 1000, scoring="sigmoid")
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32) * 3
    out = explainer.explain(x, classes=Targets(multilabel=threshold), batch_size=2)
    probability = 1 / (1 + np.exp(-out.logits.astype(np.float64)))
    for n in range(len(x)):
        picked = out.classes[n][out.classes[n] >= 0]
        assert set(picked.tolist()) == set(np.nonzero(probability[n] >= threshold)[0].tolist())
        np.testing.assert_allclose(out.scores[n][: len(picked)], probability[n][picked], rtol=1e-5)
        assert np.all(np.diff(out.scores[n][: len(picked)]) <= 0)  # highest first
        assert np.all(out.maps[n][len(picked):] == 0) and np.all(out.scores[n][len(picked):] == 0)
        if len(picked):
            want = explainer.explain(x[n:n + 1], classes=picked.tolist())
            np.testing.assert_allclose(out.maps[n][: len(picked)], want.maps[0], rtol=1e-6)


def test_multilabel_images_get_their_own_number_of_classes():
    explainer, rng = make(k=3, c=6, scoring="sigmoid")
    images = [rng.random((8, 8, 3)).astype(np.float32) * s for s in (0.0, 3.0, 6.0)]
    results = explainer.explain_images(images, classes=Targets(multilabel=0.5),
                                       preprocess=camcore.Preprocess(8, mean=(0, 0, 0), std=(1, 1, 1)))
    for r in results:
        assert len(r.classes) == len(r.scores) == len(r.cams) == len(r.boxes)
        assert np.all(r.scores >= 0.5) and np.all(r.classes >= 0)


def test_top_k_and_fixed_targets_match_plain_classes():
    explainer, rng = make(k=3, c=5)
    x = rng.standard_normal((5, 3, 8, 8)).astype(np.float32)
    for targets, plain in ((Targets(top_k=2), dict(top_k=2)), (Targets([4, 1]), dict(classes=[4, 1]))):
        got, want = explainer.explain(x, classes=targets, batch_size=2), explainer.explain(x, batch_size=2, **plain)
        np.testing.assert_array_equal(got.classes, want.classes)
        np.testing.assert_allclose(got.maps, want.maps, rtol=1e-6)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)


def test_finer_references_are_the_nearest_logits():
    logits = np.array([2.0, 9.0, 8.5, -1.0, 7.0, 9.2])
    refs, weights = finer_references(logits, 1, count=3)
    assert refs.tolist() == [5, 2, 4]  # |9.2-9|=.2, |8.5-9|=.5, |7-9|=2
    p = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(weights, p[refs] / p[refs].sum())


@pytest.mark.parametrize("method", ["cam", "gradcam", "hirescam"])
def test_contrast_with_a_class_is_the_difference_of_two_classes(method):
    model, weights, _ = tiny_model(5)
    explainer = camcore.load(model)
    x = inputs(4)
    out = explainer.explain(x, classes=Targets([3], contrast=1), method=method)
    features, _ = explainer.forward({"x": x})
    if method == "cam":  # w_3 - w_1, by hand
        want = np.einsum("k,nkhw->nhw", weights[3] - weights[1], features)[:, None]
    else:
        grads = explainer.gradients(x, classes=[3, 1])
        want = GRADIENT_METHODS[method](features, grads.gradients[:, :1] - grads.gradients[:, 1:], layout="NCHW")
    np.testing.assert_allclose(out.maps, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out.classes, [[3]] * 4)


def test_contrastive_gradients_equal_the_difference_of_the_two_classes_gradients():
    model, _, _ = tiny_model(5, hidden=7, seed=3)  # a non-affine head: gradients vary with the input
    explainer = camcore.load(model)
    x = inputs(3, seed=4)
    features, _ = explainer.forward({"x": x})
    seeds = np.zeros((3, 1, 5), np.float32)
    seeds[:, 0, 2], seeds[:, 0, 4] = 1, -1
    contrast = np.asarray(explainer.backend.run_head(features, seeds))
    grads = explainer.gradients(x, classes=[2, 4]).gradients
    np.testing.assert_allclose(contrast[:, 0], grads[:, 0] - grads[:, 1], rtol=1e-5, atol=1e-6)
    out = explainer.explain(x, classes=Targets([2], contrast=4), method="gradcam")
    np.testing.assert_allclose(out.maps, GRADIENT_METHODS["gradcam"](features, contrast, layout="NCHW"),
                               rtol=1e-5, atol=1e-6)


def test_finer_contrast_seed_is_the_weighted_difference():
    model, _, _ = tiny_model(6, hidden=5, seed=5)
    explainer = camcore.load(model)
    x = inputs(2, seed=6)
    out = explainer.explain(x, classes=Targets(contrast="finer", alpha=0.7, references=2), method="gradcam")
    features, logits = explainer.forward({"x": x})
    grads = explainer.gradients(x, classes=np.arange(6)).gradients  # (n, C, K, h, w)
    for n in range(2):
        c = int(np.argmax(logits[n]))
        refs, w = finer_references(logits[n], c, count=2)
        g = grads[n, c] - 0.7 * np.tensordot(w, grads[n, refs], axes=1)
        want = GRADIENT_METHODS["gradcam"](features[n:n + 1], g[None, None].astype(np.float32), layout="NCHW")
        np.testing.assert_allclose(out.maps[n:n + 1], want, rtol=1e-4, atol=1e-6)
        assert out.classes[n, 0] == c


def test_negated_logit_of_a_single_logit_sigmoid_model_by_hand():
    model, weights, bias = tiny_model(1, sigmoid=True, seed=7)
    explainer = camcore.load(model)
    assert explainer.head.num_classes == 1 and explainer.head.scoring == "sigmoid"
    x = inputs(3, seed=8)
    features, logits = explainer.forward({"x": x})
    out = explainer.explain(x, classes=Targets([0, NEGATIVE]), method="cam")
    positive = np.einsum("k,nkhw->nhw", weights[0], features)
    np.testing.assert_allclose(out.maps[:, 0], positive, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.maps[:, 1], -positive, rtol=1e-5, atol=1e-6)  # the negated logit
    # its mean plus the negated bias is the negated logit; its score is 1 - sigmoid(logit)
    np.testing.assert_allclose(out.maps[:, 1].mean(axis=(1, 2)) - bias[0], -logits[:, 0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.scores[:, 1], 1 - 1 / (1 + np.exp(-logits[:, 0])), rtol=1e-5)
    np.testing.assert_array_equal(out.classes, [[0, 1]] * 3)
    # Grad-CAM of the negation: the weights are minus the positive's, so relu(-sum w_k f_k) here
    grad = explainer.explain(x, classes=Targets([NEGATIVE]), method="gradcam")
    np.testing.assert_allclose(grad.maps[:, 0], np.maximum(-positive / 64, 0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["eigencam", "ablationcam", "reciprocam"])
def test_contrast_is_refused_by_methods_that_score_one_class(method):
    explainer, rng = make(k=3, c=4)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    targets = Targets([1], contrast=2)
    with pytest.raises(InvalidInput, match="contrastive targets need one of cam, gradcam"):
        targets.check_method(method, 4)
    with pytest.raises(InvalidInput, match="need one of cam"):
        explainer.explain(x, classes=targets, method=method)
    Targets([1]).check_method(method, 4)  # plain targets: any method


@pytest.mark.parametrize("kwargs, message", [
    (dict(classes=[5]), "class 5 is out of range"),
    (dict(classes=[[0], [1], [2]]), "targets hold classes for 3 items, got 2"),
    (dict(contrast=9), r"contrast class must be in \[0, 4\)"),
    (dict(top_k=5), r"top_k must be an int in \[1, 4\]"),
])
def test_targets_validated_against_the_model(kwargs, message):
    explainer, rng = make(k=3, c=4)
    with pytest.raises(InvalidInput, match=message):
        explainer.explain(rng.standard_normal((2, 3, 8, 8)).astype(np.float32), classes=Targets(**kwargs))


@pytest.mark.parametrize("kwargs, message", [
    (dict(classes=["cat"]), "names go through"),
    (dict(classes=[0], multilabel=0.3), "not both"),
    (dict(multilabel=1.5), r"threshold in \[0, 1\]"),
    (dict(contrast="nearest"), "contrast must be"),
    (dict(references=0), "references must be a positive int"),
    (dict(classes=[]), "at least one class"),
])
def test_targets_arguments(kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        Targets(**kwargs)


def test_targets_from_options(tmp_path):
    from camcore.targets import targets_from_options

    common = dict(class_names=NAMES, num_classes=4)
    assert targets_from_options(**common) is None
    t = targets_from_options(classes="lynx,0", contrast="Persian", **common)
    assert (t.fixed, t.contrast) == ([3, 0], 2)
    assert targets_from_options(multilabel=0.3, **common).multilabel == 0.3
    t = targets_from_options(contrast="finer", top_k=2, **common)
    assert (t.fixed, t.top_k, t.contrast) == (None, 2, "finer")
    paths = [str(p) for p in _images(tmp_path, ["a.png"])]
    (tmp_path / "t.csv").write_text("a.png,tiger cat\n")
    assert targets_from_options(targets_file=tmp_path / "t.csv", images=paths, **common).rows == [[1]]
    with pytest.raises(InvalidInput, match="give one of classes, targets or multilabel, got classes and multilabel"):
        targets_from_options(classes="0", multilabel=0.5, **common)
    with pytest.raises(InvalidInput, match="contrast: unknown class 'zebra'"):
        targets_from_options(contrast="zebra", **common)


def test_keyed_targets_follow_their_keys():
    t = Targets([[0], [1, 2], [3]]).keyed(["a.png", "b.png", "c.png"])
    assert t.for_keys(["c.png", "a.png"]).rows == [[3], [0]]
    assert Targets([1]).for_keys(["x"]).fixed == [1]
    assert t.fingerprint() != Targets([[0], [1, 2], [2]]).keyed(["a.png", "b.png", "c.png"]).fingerprint()
    assert t.fingerprint() in repr(t)
    with pytest.raises(InvalidInput, match="no targets for d.png"):
        t.for_keys(["d.png"])
    with pytest.raises(InvalidInput, match="not keyed"):
        Targets([[0]]).for_keys(["a.png"])
