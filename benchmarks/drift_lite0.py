"""The drift table of the README: EfficientNet-Lite0 (float) against its three int8 forms.

Quantizes the embedded model with onnxruntime's tools (tests/quantized.py: quant_pre_process,
then quantize_static QDQ and QOperator with weights per channel, calibrated on four
skimage.data photos, and quantize_dynamic with its defaults), runs `camcore.drift.drift` on
seven sample photos, prints the table and writes ``drift_lite0.json`` and the worst images of
each form (``drift_lite0_<form>.png``) next to this script.

    PYTHONPATH=. python benchmarks/drift_lite0.py [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "stereo_motorcycle", "camera", "coins")


def main() -> None:
    import numpy as np
    from skimage import data
    from skimage import io as skio

    import camcore
    from camcore import default_model
    from camcore.drift import drift, picture
    from tests import quantized

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="deletion steps (default: 16)")
    args = parser.parse_args()
    images = [getattr(data, n)() for n in PHOTOS]
    images[PHOTOS.index("stereo_motorcycle")] = images[PHOTOS.index("stereo_motorcycle")][0]
    reference = camcore.load(providers=["cpu"])
    results = {}
    print(f"{'form':<10}{'top-1':>8}{'r mean':>8}{'r min':>8}{'IoU':>7}{'dAvgDrop':>10}{'dDelAUC':>9}")
    for form in quantized.FORMATS:
        path = quantized.build(default_model.path(), form, preprocess=default_model.preprocess())
        out = drift(reference, path, images, sources=PHOTOS, steps=args.steps)
        o = out["overall"]
        agree = sum(r["top1_agree"] for r in out["images"])
        print(f"{form:<10}{agree:>6}/{len(images)}{o['pearson_mean']:>8.3f}{o['pearson_min']:>8.3f}"
              f"{o['box_iou_mean']:>7.3f}{o['delta_average_drop']:>+10.1f}{o['delta_deletion_auc']:>+9.3f}")
        skio.imsave(HERE / f"drift_lite0_{form}.png", picture(out, images, class_name=reference.class_name),
                    check_contrast=False)
        results[form] = {"overall": o, "methods": out["methods"], "images": out["images"]}
    (HERE / "drift_lite0.json").write_text(json.dumps({"steps": args.steps, "photos": PHOTOS,
                                                       "calibration": quantized.CALIBRATION,
                                                       "recipe": quantized.RECIPE, "forms": results},
                                                      indent=2, default=lambda v: np.asarray(v).tolist()) + "\n")


if __name__ == "__main__":
    main()
