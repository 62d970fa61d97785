"""Graph analysis and runtime adapters for camcore: ONNX graphs built once, run by onnxruntime or OpenVINO.

Runtime-agnostic graph work (each edit returns a copy):

* `_proto`: ONNX proto helpers (attributes, dims, opset, node labels, copies), once.
* `onnx_graph`: loading, finding the head and target layers, constant folding.
* `token_graph`, `token_gather`, `attention_graph`: vision transformers (token analysis, the
  pooled tokens read early, attention probabilities and their gradients).
* `quant_graph`, `contrib_ops`, `precision`: deployed forms (int8, onnxruntime's fused ops, float16).
* `backprop`: reverse-mode gradients as plain ONNX nodes; one module per rule family.
* `fuse_graph`: one ONNX graph computing the maps themselves.
* `graph_backend`: `GraphBackend`, which decides the graphs a method needs for any runtime,
  and `analysis_cache`, the on-disk cache of the analysis both runtimes read.

Runtimes (`runtime` holds their Protocols; an adapter only compiles and runs ONNX):

* `ort_runtime`, `ort_session`: onnxruntime sessions and `OrtBackend`.
* `ov_session`: OpenVINO's `OvRuntime` and `OvBackend`.

A new runtime is one adapter module implementing `runtime.Runtime`; `GraphBackend` gives it
every method.  Nothing here imports the camcore application or CLI.
"""
