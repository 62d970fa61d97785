"""Print the transformer corpus table: what camcore finds in each export, and its gradient error.

For each ``transformers`` entry of the corpus manifest (``$CAMCORE_CORPUS_HOME``): family,
exporter, the pooling camcore finds (and the manifest's when they differ), prefix tokens, grid,
the default target layer, and the largest relative gradient error against torch's
``torch.autograd.grad`` at the last block's input and the final norm's input.  ``--json PATH``
also writes the rows.  Usage: ``python tools/transformer_table.py [--json rows.json]``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import camcore  # noqa: E402
from tests import corpus  # noqa: E402
from tests.test_transformers import oracle_targets  # noqa: E402


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        a = a.reshape(b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def row(entry) -> dict:
    case = corpus.load(entry)
    d = case["data"]
    size = entry.get("image_size")
    kw = dict(providers=["cpu"], size=(size, size) if size else None)
    out = {"name": entry["name"], "family": f"{entry.get('library', '?')} {entry.get('family', '?')}",
           "exporter": entry.get("export_kind", "?")}
    try:
        explainer = camcore.load(case["path"], **kw)
        head, t = explainer.head, explainer.head.tokens
        if t is None:
            out.update(pooling=f"none ({head.pooling or 'no pooling'})", prefix="-", grid="-", layer=head.feature,
                       error="-")
            return out
        which = {t.block_input: "last block input", t.norm_input: "final norm input"}.get(head.feature, "pooled")
        pooling = t.pooling if t.pooling == entry["pooling"] else f"{t.pooling} (manifest: {entry['pooling']})"
        prefix = str(t.prefix) if t.prefix == entry.get("prefix_tokens") else \
            f"{t.prefix} (manifest: {entry.get('prefix_tokens')})"
        grid = "x".join(map(str, t.grid))
        if list(t.grid) != list(entry.get("grid", t.grid)):
            grid += f" (manifest: {'x'.join(map(str, entry['grid']))})"
        errors = []
        for key, name, theirs, their_grad in oracle_targets(entry, d, t):
            e = camcore.load(case["path"], feature=name, **kw)
            g = e.gradients({e.head.input.name: d["x"]}, classes=d["grad_classes"][:, None])
            errors.append(max(_rel(g.gradients[:, 0], their_grad), _rel(g.features, theirs)))
        out.update(pooling=pooling, prefix=prefix, grid=grid, layer=f"{which} ({head.feature})",
                   error=f"{max(errors):.1e}" if errors else "-")
    except camcore.CamError as exc:
        out.update(pooling=f"ERROR: {exc}", prefix="", grid="", layer="", error="")
    except Exception as exc:  # a raw exception is a camcore bug: shown as such
        out.update(pooling=f"RAW {type(exc).__name__}: {exc}", prefix="", grid="", layer="", error="")
    return out


def main() -> None:
    entries = corpus.manifest("transformers")
    rows = [row(e) for e in entries]
    keys = ("family", "exporter", "pooling", "prefix", "grid", "layer", "error")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    if "--json" in sys.argv:
        Path(sys.argv[sys.argv.index("--json") + 1]).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
