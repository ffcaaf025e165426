"""Tiny randomly initialised models for the evaluation tests, saved to disk and loaded back
through ``from_pretrained`` like real checkpoints.

``build_tiny_clip``: a full CLIPModel (vision and text towers, 32 px images, 16-d projection)
with the CLIPProcessor a hub checkpoint ships (image processor + the byte-level tokenizer of
``tiny_models``), all in one folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                          CLIPTextConfig, CLIPVisionConfig)

from tests.tiny_models import MAX_LENGTH, TEXT_HIDDEN, make_tokenizer

IMAGE_SIZE = 32
PROJECTION_DIM = 16


def build_tiny_clip(folder: Union[str, Path], seed: int = 0) -> Path:
    """A CLIPModel and its CLIPProcessor saved into ``folder``."""
    folder = Path(folder)
    tokenizer = make_tokenizer(folder.parent / f"{folder.name}-tokenizer-source")
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=37,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    vision_config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=8)
    config = CLIPConfig(text_config=text_config.to_dict(),
                        vision_config=vision_config.to_dict(), projection_dim=PROJECTION_DIM)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(
        str(folder))
    model.save_pretrained(str(folder))
    return folder
