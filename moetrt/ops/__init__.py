"""The two MoE ops of domain ``moetrt`` (version 1), one file each with all their faces."""

from moetrt.ops.sparse_moe import sparse_moe, sparse_moe_eager, sparse_moe_reference
from moetrt.ops.topk_routing import routing_weights, topk_routing, topk_routing_reference

DOMAIN = "moetrt"
DOMAIN_VERSION = 1

__all__ = [
    "DOMAIN",
    "DOMAIN_VERSION",
    "topk_routing",
    "topk_routing_reference",
    "routing_weights",
    "sparse_moe",
    "sparse_moe_eager",
    "sparse_moe_reference",
]
