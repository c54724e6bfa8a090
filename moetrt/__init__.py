"""moetrt: Mixture-of-Experts transformers to ONNX and TensorRT, with sparse routing ops and parity.

``import moetrt`` needs only torch, onnx, numpy and safetensors; the back ends (onnxruntime,
tensorrt, triton, polygraphy) are imported inside the stage that needs them.
"""

from moetrt.checkpoint import SUPPORTED_MODEL_TYPES, from_pretrained, save_pretrained
from moetrt.config import PRESETS, MoEConfig
from moetrt.errors import BackendMissingError, CheckpointError, MoetrtError, UnsupportedModelError
from moetrt.model import MoEOutput, MoETransformer

__version__ = "0.1.0"

__all__ = [
    "MoEConfig",
    "PRESETS",
    "MoETransformer",
    "MoEOutput",
    "from_pretrained",
    "save_pretrained",
    "SUPPORTED_MODEL_TYPES",
    "MoetrtError",
    "UnsupportedModelError",
    "CheckpointError",
    "BackendMissingError",
]
