"""torch -> canonical ONNX (moetrt::TopKRouting + moetrt::SparseMoE), I/O spec, metadata."""
