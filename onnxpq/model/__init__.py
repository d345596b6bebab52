"""The ONNX model itself: its files, its graph index and subgraphs, and onnxruntime sessions on it."""
