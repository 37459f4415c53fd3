"""The tiny LLaVA: built offline in the HF format, reloaded through the real loader, generating in batches."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tessera.models import refs
from tessera.models.llava import IMAGE_TOKEN, load_llava, prompt_text


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return refs.resolve("tiny:llava", str(tmp_path_factory.mktemp("models")))


def test_tiny_llava_is_saved_in_the_hf_format(tiny_llava):
    config = json.load(open(f"{tiny_llava}/config.json"))
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert config["text_config"]["model_type"] == "llama"
    model, processor = load_llava(tiny_llava)
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert sum(p.numel() for p in model.parameters()) < 500_000  # fast on a CPU
    assert processor.tokenizer.padding_side == "left"


def test_prompt_uses_the_chat_template_and_expands_the_image_token(tiny_llava):
    _, processor = load_llava(tiny_llava)
    text = prompt_text(processor, "Describe it.")
    assert text == "USER: <image>\nDescribe it. ASSISTANT:"
    inputs = processor(images=[Image.new("RGB", (50, 30), "red")], text=[text], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert int((inputs["input_ids"] == image_id).sum()) == 16  # (32 / 8) ** 2 patches, CLS dropped
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)


def test_left_padded_batch_generates_what_each_prompt_generates_alone(tiny_llava):
    model, processor = load_llava(tiny_llava)
    images = [Image.new("RGB", (40, 40), (200, 30, 30)), Image.new("RGB", (64, 32), (20, 20, 220))]
    texts = [prompt_text(processor, "Describe this image."),
             prompt_text(processor, "Describe this image in as much detail as possible, please.")]
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"][0, 0] == 0) and (batch["attention_mask"][0, -1] == 1)  # padded on the left
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    with torch.inference_mode():
        together = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1]:]
        for i in range(2):
            alone = processor(images=images[i:i + 1], text=texts[i:i + 1], return_tensors="pt")
            out = model.generate(**alone, **kwargs)[:, alone["input_ids"].shape[1]:]
            assert together[i].tolist() == out[0].tolist()
