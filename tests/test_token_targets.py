"""Chosen targets (contrastive, negated) on vision transformers: tiny token models built with
onnx.helper (tests/vit_zoo.py), one real ViT export of the corpus, and the CLI.

A seeded target explains ``s . logits``; its gradients at the token target layer are linear in
``s``, so a contrast's are the difference of the two classes' and a negated class's are minus the
class's.  The maps are the method's on those gradients, on the patch grid, prefix tokens dropped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from PIL import Image

import camcore
from camcore import InvalidInput
from camcore.methods import GRADIENT_METHODS
from camcore.methods.attention import gae
from camcore.perturbation import FORWARD_METHODS
from camcore.targets import NEGATIVE, SEEDED_METHODS, Targets
from camcore.tokens import tokens_to_grid
from tests.vit_zoo import vit

CASES = [("cls", 1, (2, 3)), ("cls_dist_mean", 2, (3, 2)), ("cls_concat_mean", 5, (2, 2)),
         ("token_mean_no_prefix", 1, (2, 3)), ("token_mean", 0, (3, 2))]


def _x(model, n=3, seed=0):
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).standard_normal((n, *dims[1:])).astype(np.float32)


def _grid(tokens, explainer, axis_prefix=1):
    """(n, [k,] T, C) tokens -> (n, [k,] gh, gw, C): the patch tokens on the grid, by hand."""
    t = explainer.head.tokens
    lead = tokens.shape[:axis_prefix]
    patches = tokens[(slice(None),) * axis_prefix + (slice(t.prefix, None),)]
    return patches.reshape(*lead, *t.grid, tokens.shape[-1])


def test_gae_is_seedable_and_forward_methods_are_not():
    assert "gae" in SEEDED_METHODS and {"cam", *GRADIENT_METHODS} <= set(SEEDED_METHODS)
    assert not {"rollout", "eigencam", *FORWARD_METHODS} & set(SEEDED_METHODS)


@pytest.mark.parametrize("pooling,prefix,grid", CASES, ids=str)
def test_contrast_gradients_are_the_difference_and_maps_are_the_methods(pooling, prefix, grid):
    model = vit(pooling=pooling, prefix=prefix, grid=grid)
    explainer = camcore.load(model, providers=["cpu"])
    x = _x(model)
    features, _ = explainer.forward({"x": x})
    seeds = np.zeros((3, 1, 5), np.float32)
    seeds[:, 0, 3], seeds[:, 0, 1] = 1, -1
    contrast = np.asarray(explainer.backend.run_head(features, seeds))  # (n, 1, T, C)
    g = explainer.gradients(x, classes=[3, 1]).gradients
    assert np.abs(g[:, 0] - g[:, 1]).max() > 0
    np.testing.assert_allclose(contrast[:, 0], g[:, 0] - g[:, 1], rtol=1e-5, atol=1e-6)
    f = _grid(features, explainer).astype(np.float64)
    d = _grid(contrast, explainer, 2).astype(np.float64)
    for method, function in GRADIENT_METHODS.items():
        out = explainer.explain(x, classes=Targets([3], contrast=1), method=method)
        assert out.maps.shape == (3, 1, *grid) and out.maps.dtype == np.float32
        np.testing.assert_array_equal(out.classes, [[3]] * 3)
        want = function(f, d, layout="NHWC")
        np.testing.assert_allclose(out.maps, want, rtol=1e-4, atol=1e-6, err_msg=method)
    # Grad-CAM by hand: relu(sum_c mean_xy(d) f), prefix tokens dropped
    by_hand = np.maximum(np.einsum("nkc,nhwc->nkhw", d.mean(axis=(2, 3)), f), 0)
    out = explainer.explain(x, classes=Targets([3], contrast=1), method="gradcam")
    np.testing.assert_allclose(out.maps, by_hand, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pooling,prefix,grid", CASES[:3], ids=str)
def test_negated_seed_gives_minus_the_gradients(pooling, prefix, grid):
    model = vit(pooling=pooling, prefix=prefix, grid=grid)
    explainer = camcore.load(model, providers=["cpu"])
    x = _x(model, n=2, seed=1)
    features, _ = explainer.forward({"x": x})
    classes = np.array([[2], [4]])
    seeds = np.zeros((2, 1, 5), np.float32)
    seeds[[0, 1], 0, classes[:, 0]] = -1
    negated = np.asarray(explainer.backend.run_head(features, seeds))
    plain = explainer.gradients(x, classes=classes).gradients
    np.testing.assert_allclose(negated, -plain, rtol=1e-6, atol=1e-7)
    # HiResCAM, relu(sum_c g f): the negated target keeps the positive part of minus the class's sum
    minus = explainer.maps(features, classes, method="hirescam", inputs={"x": x}, seeds=seeds)
    f, d = _grid(features, explainer).astype(np.float64), _grid(plain, explainer, 2).astype(np.float64)
    signed = np.einsum("nkhwc,nhwc->nkhw", d, f)
    assert (signed > 0).any() and (signed < 0).any()
    np.testing.assert_allclose(minus, np.maximum(-signed, 0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(explainer.maps(features, classes, method="hirescam", inputs={"x": x}),
                               np.maximum(signed, 0), rtol=1e-4, atol=1e-6)


def test_negative_class_of_a_single_logit_token_model():
    model = vit(pooling="cls", prefix=1, grid=(2, 3), classes=1)
    explainer = camcore.load(model, providers=["cpu"])
    assert explainer.head.num_classes == 1
    x = _x(model, n=2, seed=2)
    features, logits = explainer.forward({"x": x})
    out = explainer.explain(x, classes=Targets([0, NEGATIVE]), method="hirescam")
    np.testing.assert_array_equal(out.classes, [[0, 1]] * 2)
    g = explainer.gradients(x, classes=[0]).gradients[:, 0]
    signed = (_grid(features, explainer) * _grid(g, explainer)).sum(-1)  # HiResCAM: relu(sum_c g f)
    assert (signed > 0).any() and (signed < 0).any()
    np.testing.assert_allclose(out.maps[:, 0], np.maximum(signed, 0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.maps[:, 1], np.maximum(-signed, 0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("prefix,grid", [(1, (2, 3)), (0, (3, 2))])
def test_contrast_cam_is_exact_on_a_mean_over_patch_tokens(prefix, grid):
    model = vit(pooling="token_mean_no_prefix" if prefix else "token_mean", prefix=prefix, grid=grid)
    explainer = camcore.load(model, providers=["cpu"])
    assert explainer.head.affine
    x = _x(model, n=3, seed=3)
    out = explainer.explain(x, classes=Targets([0, 2], contrast=4), method="cam")
    features, logits = explainer.forward({"x": x})
    w, b = explainer.head.weights.astype(np.float64), explainer.head.bias.astype(np.float64)
    f = _grid(features, explainer).astype(np.float64)
    want = np.einsum("nhwc,kc->nkhw", f, w[[0, 2]] - w[4])
    np.testing.assert_allclose(out.maps, want, rtol=1e-4, atol=1e-5)
    # the map's mean is the contrast of the logits, less the bias difference
    np.testing.assert_allclose(out.maps.mean((-2, -1)) + (b[[0, 2]] - b[4]),
                               logits[:, [0, 2]] - logits[:, [4]], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pooling,prefix,grid", [("cls", 1, (2, 3)), ("cls_concat_mean", 2, (2, 2)),
                                                 ("token_mean", 0, (3, 2))], ids=str)
def test_gae_contrast_seeds_the_attention_gradients(pooling, prefix, grid):
    model = vit(pooling=pooling, prefix=prefix, grid=grid, blocks=3)
    explainer = camcore.load(model, providers=["cpu"])
    x = _x(model, n=2, seed=4)
    out = explainer.explain(x, classes=Targets([1], contrast=3), method="gae")
    assert out.maps.shape == (2, 1, *grid)
    tokens = prefix + grid[0] * grid[1]
    per_class = []
    for c in (1, 3):
        seeds = np.zeros((2, 1, 5), np.float32)
        seeds[:, 0, c] = 1
        probabilities, grads = explainer.backend.run_attention({"x": x}, seeds, tokens=tokens)
        per_class.append([np.asarray(g, np.float64) for g in grads])
    difference = [a - b for a, b in zip(*per_class)]
    want = gae([np.asarray(p, np.float64) for p in probabilities], difference, prefix=prefix, grid=grid,
               pooling=pooling)
    np.testing.assert_allclose(out.maps, want, rtol=1e-4, atol=1e-6)
    assert np.abs(out.maps).max() > 0
    # not the class alone: the reference class's gradients are subtracted before the relu
    alone = explainer.explain(x, classes=[1], method="gae").maps
    assert not np.allclose(out.maps, alone, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("method", ["eigencam", "ablationcam", "scorecam", "reciprocam", "rollout"])
def test_forward_only_methods_refuse_seeds_in_one_line(method):
    model = vit(pooling="cls", prefix=1, grid=(2, 3))
    explainer = camcore.load(model, providers=["cpu"])
    x = _x(model, n=2)
    with pytest.raises(InvalidInput, match="need one of cam, gradcam") as refused:
        explainer.explain(x, classes=Targets([1], contrast=2), method=method)
    assert "\n" not in str(refused.value) and "layercam, gae (on a transformer)" in str(refused.value)
    features, _ = explainer.forward({"x": x})
    seeds = np.zeros((2, 1, 5), np.float32)
    seeds[:, 0, 1] = -1
    with pytest.raises(InvalidInput, match="need one of cam"):
        explainer.maps(features, np.ones((2, 1), np.int64), method=method, inputs={"x": x}, seeds=seeds)


def test_cam_contrast_refused_where_cam_is_not_exact():
    model = vit(pooling="cls", prefix=1, grid=(2, 3))
    explainer = camcore.load(model, providers=["cpu"])
    with pytest.raises(camcore.NotCamCompatible):
        explainer.explain(_x(model, n=1), classes=Targets([1], contrast=2), method="cam")


def _cli(*args):
    env = {**os.environ, "CAMCORE_CACHE_DIR": "off"}
    return subprocess.run([sys.executable, "-m", "camcore.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _explain_cli(path, tmp_path, *options):
    image = tmp_path / "image.png"
    Image.fromarray((np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "out"
    run = _cli("explain", str(path), str(image), "--out", str(out), "--json", "--quiet", "--save-maps", *options)
    return run, image, out


def test_cli_contrast_on_a_tiny_transformer_saves_the_apis_maps(tmp_path):
    model = vit(pooling="cls", prefix=2, grid=(2, 3))
    path = tmp_path / "vit.onnx"
    onnx.save(model, path)
    run, image, out = _explain_cli(path, tmp_path, "--method", "gradcam", "--classes", "3", "--contrast", "0")
    assert run.returncode == 0, run.stderr
    saved = camcore.load_maps(out / "image.maps.npz")[0]
    api = camcore.load(path, providers=["cpu"]).explain_images([image], classes=Targets([3], contrast=0),
                                                               method="gradcam")[0]
    assert saved.classes.tolist() == [3] and saved.cams.shape == (1, 2, 3)
    np.testing.assert_allclose(saved.cams, api.cams, rtol=1e-5, atol=1e-7)
    assert np.abs(saved.cams).max() > 0
    refused = _cli("explain", str(path), str(image), "--out", str(tmp_path / "no"), "--method", "reciprocam",
                   "--contrast", "0")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "need one of cam, gradcam" in refused.stderr
    assert not (tmp_path / "no").exists() or not any((tmp_path / "no").iterdir())


# ----------------------------------------------------------------- a real ViT export

corpus = pytest.importorskip("tests.corpus", reason="tests/corpus.py (the real-export corpus) is not in this checkout")
VIT = "timm_vit_ts"


def _vit_case():
    corpus.require("transformers")
    entries = [e for e in corpus.manifest("transformers") if corpus.entry_id(e) == f"transformers-{VIT}"]
    assert entries, f"the corpus has no {VIT}"
    case = corpus.load(entries[0])
    size = case["image_size"]
    return case, camcore.load(case["path"], providers=["cpu"], size=(size, size))


def test_real_vit_contrast_and_negated_gradients_are_linear_in_the_seed():
    case, explainer = _vit_case()
    d = case["data"]
    x = {explainer.head.input.name: d["x"].astype(np.float32)}
    features, logits = explainer.forward(x)
    n, num = len(features), explainer.head.num_classes
    a = d["grad_classes"].astype(np.int64)
    ref = next(c for c in range(num) if c not in a)  # the reference class of the contrast
    b = np.full_like(a, ref)
    g = explainer.gradients(x, classes=np.stack([a, b], 1)).gradients
    seeds = np.zeros((n, 2, num), np.float32)
    seeds[np.arange(n), 0, a], seeds[np.arange(n), 0, b] = 1, -1  # a - ref
    seeds[np.arange(n), 1, a] = -1  # -a
    seeded = np.asarray(explainer.backend.run_head(features, seeds))
    scale = np.abs(g).max()
    assert np.abs(g[:, 0] - g[:, 1]).max() > 1e-3 * scale
    np.testing.assert_allclose(seeded[:, 0], g[:, 0] - g[:, 1], rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(seeded[:, 1], -g[:, 0], rtol=1e-4, atol=1e-5 * scale)
    # torch's own gradient of class a at the last block's input: the negated seed's is its negation
    theirs = d[case["targets"]["block_input"]["grad"]]
    assert explainer.head.feature == explainer.head.tokens.block_input
    np.testing.assert_allclose(-seeded[:, 1], theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
    # the explain path: each item's class (rows) against the reference, Grad-CAM on the patch grid
    out = explainer.explain(x, classes=Targets(a[:, None].tolist(), contrast=ref), method="gradcam")
    np.testing.assert_array_equal(out.classes[:, 0], a)
    tokens = explainer.head.tokens
    want = GRADIENT_METHODS["gradcam"](tokens_to_grid(features, tokens.grid, prefix=tokens.prefix),
                                       tokens_to_grid(g[:, :1] - g[:, 1:], tokens.grid, prefix=tokens.prefix),
                                       layout="NHWC")
    assert out.maps.shape == (n, 1, *tokens.grid) and np.abs(want).max() > 0
    np.testing.assert_allclose(out.maps, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_real_vit_cli_contrast_and_targets_file(tmp_path):
    case, explainer = _vit_case()
    image = tmp_path / "image.png"
    Image.fromarray((np.random.default_rng(5).random((48, 40, 3)) * 255).astype(np.uint8)).save(image)
    targets = tmp_path / "targets.csv"
    targets.write_text("image,class\nimage.png,2\n")
    out = tmp_path / "out"
    run = _cli("explain", str(case["path"]), str(image), "--out", str(out), "--json", "--quiet", "--save-maps",
               "--method", "gradcam++", "--targets", str(targets), "--contrast", "finer")
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)
    assert results
    saved = camcore.load_maps(out / "image.maps.npz")[0]
    api = explainer.explain_images([image], classes=Targets([[2]], contrast="finer"), method="gradcam++")[0]
    assert saved.classes.tolist() == [2] and saved.cams.shape == (1, *explainer.head.tokens.grid)
    np.testing.assert_allclose(saved.cams, api.cams, rtol=1e-4, atol=1e-7)
    assert np.abs(saved.cams).max() > 0
