"""Seed README example (§3.2.1 detection / grounding / referring), adapted to run anywhere. Changes from the seed, and only these:

- paths: the ChatRex folder, UPN checkpoint, test image and output folder come from the environment
  (CHATREX_MLLM, CHATREX_UPN, CHATREX_IMAGE, CHATREX_OUT; argv[1] may give the image);
- device: the seed hard-codes "cuda", which is not available everywhere; only that string is replaced
  by DEVICE (CHATREX_DEVICE, else an accelerator when present, else "cpu");
- UPN size: `UPNWrapper(ckpt_path, config=UPN_CONFIG)` (CHATREX_UPN_CONFIG, default "large" = the
  seed's only size) so the tiny test checkpoint loads.
The model code path (AutoProcessor / AutoModelForCausalLM with trust_remote_code, processor.process,
model.generate(inputs, gen_config=..., tokenizer=...), visualize_chatrex_output) is the seed's.
"""

import os
import sys

import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, GenerationConfig

from chatrex.tools.visualize import visualize_chatrex_output
from chatrex.upn import UPNWrapper

MLLM = os.environ.get("CHATREX_MLLM", "IDEA-Research/ChatRex-7B")
UPN_CKPT = os.environ.get("CHATREX_UPN", "checkpoints/upn_checkpoints/upn_large.pth")
UPN_CONFIG = os.environ.get("CHATREX_UPN_CONFIG", "large")
IMAGE = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("CHATREX_IMAGE", "tests/images/test_chatrex_detection.jpg")
OUT = os.environ.get("CHATREX_OUT", "tests")
DEVICE = os.environ.get("CHATREX_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")

if __name__ == "__main__":
    # load the processor
    processor = AutoProcessor.from_pretrained(
        MLLM,
        trust_remote_code=True,
        device_map=DEVICE,
    )

    print(f"loading chatrex model...")
    # load chatrex model
    model = AutoModelForCausalLM.from_pretrained(
        MLLM,
        trust_remote_code=True,
        use_safetensors=True,
    ).to(DEVICE)

    # load upn model
    print(f"loading upn model...")
    ckpt_path = UPN_CKPT
    model_upn = UPNWrapper(ckpt_path, config=UPN_CONFIG)
    test_image_path = IMAGE

    # get upn predictions
    fine_grained_proposals = model_upn.inference(
        test_image_path, prompt_type="fine_grained_prompt"
    )
    fine_grained_filtered_proposals = model_upn.filter(
        fine_grained_proposals, min_score=0.3, nms_value=0.8
    )

    inputs = processor.process(
        image=Image.open(test_image_path),
        question="Please detect person; pigeon in this image. Answer the question with object indexes.",
        bbox=fine_grained_filtered_proposals["original_xyxy_boxes"][
            0
        ],  # box in xyxy format
    )

    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}

    # perform inference
    gen_config = GenerationConfig(
        max_new_tokens=512,
        do_sample=False,
        eos_token_id=processor.tokenizer.eos_token_id,
        pad_token_id=(
            processor.tokenizer.pad_token_id
            if processor.tokenizer.pad_token_id is not None
            else processor.tokenizer.eos_token_id
        ),
    )
    with torch.autocast(device_type=DEVICE, enabled=True, dtype=torch.bfloat16):
        prediction = model.generate(
            inputs, gen_config=gen_config, tokenizer=processor.tokenizer
        )
    print(f"prediction:", prediction)

    # visualize the prediction
    vis_image = visualize_chatrex_output(
        Image.open(test_image_path),
        fine_grained_filtered_proposals["original_xyxy_boxes"][0],
        prediction,
        font_size=15,
        draw_width=5,
    )
    vis_image.save(os.path.join(OUT, "test_chatrex_detection.jpeg"))
    print(f"prediction is saved at {os.path.join(OUT, 'test_chatrex_detection.jpeg')}")
