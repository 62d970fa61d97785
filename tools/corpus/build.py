"""Build the real-export corpus: one venv per framework, its exports, one manifest.

Runs with the system ``python3`` (standard library only)::

    python3 tools/corpus/build.py                      # every framework
    python3 tools/corpus/build.py --framework paddle   # one framework (repeatable)

Writes under ``$CAMCORE_CORPUS_HOME`` (default ``REPO/.corpus``)::

    venv-<framework>/                 the framework's venv, from pyproject's export-* extra
    models/<framework>/<name>.onnx    the export
    models/<framework>/<name>.npz     the framework's oracle (see tests/corpus.py)
    models/<framework>/<name>.json    its manifest entry
    manifest.json                     every entry, for all frameworks built so far

Cached: a venv is reinstalled only when its extra's requirements change; an export is redone
only when its files are missing or the hash of its export script (and common.py) changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# framework: (export script, pyproject extra); the framework names the models/ folder.
FRAMEWORKS = {
    "torch": ("export_torch.py", "export-torch"),
    "keras": ("export_keras.py", "export-tf"),
    "paddle": ("export_paddle.py", "export-paddle"),
    "transformers": ("export_transformers.py", "export-transformers"),
}


def home() -> Path:
    return Path(os.environ.get("CAMCORE_CORPUS_HOME") or REPO / ".corpus").resolve()


def requirements(extra: str) -> list:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"][extra]


def log(message: str) -> None:
    print(f"[corpus] {message}", flush=True)


def ensure_venv(venv: Path, extra: str) -> Path:
    """The venv's python, (re)installing the extra's requirements when they changed."""
    reqs = requirements(extra)
    stamp = venv / "camcore-requirements.json"
    python = venv / "bin" / "python"
    if python.exists() and stamp.exists() and json.loads(stamp.read_text()) == reqs:
        return python
    log(f"installing {extra} into {venv}: {' '.join(reqs)}")
    start = time.perf_counter()
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *reqs], check=True)
    stamp.write_text(json.dumps(reqs))
    log(f"installed {extra} in {time.perf_counter() - start:.0f} s")
    return python


def script_hash(script: str, framework: str) -> str:
    h = hashlib.sha256(framework.encode())
    for name in (script, "common.py"):
        h.update((HERE / name).read_bytes())
    return h.hexdigest()


def build(framework: str, root: Path) -> list:
    script, extra = FRAMEWORKS[framework]
    python = ensure_venv(root / f"venv-{framework}", extra)
    out = root / "models" / framework
    out.mkdir(parents=True, exist_ok=True)
    names = json.loads(subprocess.run([str(python), str(HERE / script), "--list"], check=True,
                                      capture_output=True, text=True).stdout)
    digest = script_hash(script, framework)
    stamps = out / "hashes.json"
    done = json.loads(stamps.read_text()) if stamps.exists() else {}

    def fresh(name):
        return done.get(name) == digest and all((out / f"{name}{ext}").exists() for ext in (".onnx", ".npz", ".json"))

    todo = [n for n in names if not fresh(n)]
    if todo:
        log(f"{framework}: exporting {len(todo)} of {len(names)}: {' '.join(todo)}")
        start = time.perf_counter()
        for name in todo:  # a stale entry never survives a failed re-export
            for ext in (".onnx", ".npz", ".json"):
                (out / f"{name}{ext}").unlink(missing_ok=True)
        result = subprocess.run([str(python), str(HERE / script), "--out", str(out), *todo],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        (out / "export.log").write_text(result.stdout)
        for name in todo:
            if (out / f"{name}.json").exists():
                done[name] = digest
        stamps.write_text(json.dumps(done, indent=1))
        if result.returncode != 0:
            sys.stdout.write(result.stdout[-4000:])
            raise SystemExit(f"[corpus] {framework} export failed (log: {out / 'export.log'})")
        log(f"{framework}: exported in {time.perf_counter() - start:.0f} s")
    else:
        log(f"{framework}: {len(names)} exports up to date")
    return [json.loads((out / f"{n}.json").read_text()) for n in names]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", action="append", choices=sorted(FRAMEWORKS),
                        help="build only this framework (repeatable); default: all")
    args = parser.parse_args(argv)
    root = home()
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"models": []}
    start = time.perf_counter()
    for framework in args.framework or list(FRAMEWORKS):
        entries = build(framework, root)
        manifest["models"] = [e for e in manifest["models"] if e["framework"] != framework] + entries
        manifest_path.write_text(json.dumps(manifest, indent=1))
    log(f"{len(manifest['models'])} exports in {manifest_path} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
