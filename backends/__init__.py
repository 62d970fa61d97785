"""Runtime adapters for camcore: ONNX graph analysis and onnxruntime sessions.

Runtime-agnostic graph work (each edit returns a copy):

* `_proto`: ONNX proto helpers (attributes, dims, opset, node labels, copies), once.
* `onnx_graph`: loading, finding the head and target layers, constant folding.
* `backprop`: reverse-mode gradients as plain ONNX nodes; one module per rule family.
* `fuse_graph`: one ONNX graph computing the maps themselves.

onnxruntime:

* `ort_runtime`: making sessions (import, providers), used by everything that runs ONNX.
* `ort_session`: `OrtBackend`, the `camcore.backend.Backend` for onnxruntime.
* `analysis_cache`: the on-disk cache of its graph analysis.

A new runtime is one adapter module beside `ort_session` that compiles and runs the
graphs these modules build.  Nothing here imports the camcore application or CLI.
"""
