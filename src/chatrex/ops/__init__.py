"""Math layer: tensors in, tensors out (box ops, NMS, RoIAlign, deformable attention, sine embeddings).

Nothing here opens files, prints or picks a device; importing it only costs `import torch`.
"""

from chatrex.ops.msda import (
    MultiScaleDeformableAttention,
    get_msda_implementation,
    ms_deform_attn_core,
    ms_deform_attn_core_pytorch,
    ms_deform_attn_core_reference,
    register_msda_implementation,
    set_msda_implementation,
)
from chatrex.ops.position import box_sine_embedding, object_box_embedding, sine_position_embedding_2d
from chatrex.ops.roi_align import roi_align

__all__ = [
    "MultiScaleDeformableAttention",
    "get_msda_implementation",
    "ms_deform_attn_core",
    "ms_deform_attn_core_pytorch",
    "ms_deform_attn_core_reference",
    "register_msda_implementation",
    "set_msda_implementation",
    "box_sine_embedding",
    "object_box_embedding",
    "sine_position_embedding_2d",
    "roi_align",
]
