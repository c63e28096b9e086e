"""Math layer: tensors in, tensors out (box ops, NMS, RoIAlign, deformable attention, sine embeddings).

Nothing here opens files, prints or picks a device; importing it only costs `import torch`.
"""

from chatrex.ops.boxes import (
    batched_nms,
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xywh_to_xyxy,
    box_xyxy_to_cxcywh,
    box_xyxy_to_xywh,
    clip_boxes_to_image,
    denormalize_boxes,
    generalized_box_iou,
    nms,
    normalize_boxes,
    remove_small_boxes,
    scale_boxes,
)
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
from chatrex.ops.roi_align import roi_align, roi_align_mean

__all__ = [
    "batched_nms",
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_xyxy_to_xywh",
    "clip_boxes_to_image",
    "denormalize_boxes",
    "generalized_box_iou",
    "nms",
    "normalize_boxes",
    "remove_small_boxes",
    "scale_boxes",
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
    "roi_align_mean",
]
