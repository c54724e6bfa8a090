"""Session over back ends (torch, ort, trt), the generate loop, KV cache, expert statistics."""
