"""Runtime adapters for camcore: ONNX graph analysis and onnxruntime sessions."""
