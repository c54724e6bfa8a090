"""Session over back ends (torch, ort, trt), the generate loop, KV cache, expert statistics.

    from moetrt.runtime import Session
    session = Session("exported/tiny", backend="ort")          # or a checkpoint / preset with backend="torch"
    print(session.generate("Once upon a time", max_new_tokens=32).texts[0])

Back ends are imported when a Session asks for them: onnxruntime only for ``backend="ort"``.
"""

from moetrt.runtime.backend import Backend, ModelSpec
from moetrt.runtime.expert_stats import ExpertStats
from moetrt.runtime.generate import Generation, SamplingOptions, sample_next
from moetrt.runtime.session import BACKENDS, GenerationResult, Session, Stream, StreamPiece

__all__ = [
    "Session",
    "GenerationResult",
    "Stream",
    "StreamPiece",
    "BACKENDS",
    "Backend",
    "ModelSpec",
    "ExpertStats",
    "Generation",
    "SamplingOptions",
    "sample_next",
]
