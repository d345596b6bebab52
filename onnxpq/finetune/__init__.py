"""PQF's F: a torch executor of the ONNX graph and distillation of the compressed model from the original."""
