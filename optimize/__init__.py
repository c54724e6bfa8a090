"""Graph passes and per-target lowering (ONNX Runtime, TensorRT)."""
