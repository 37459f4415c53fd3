"""LLaVA captioners: any LLaVA-family checkpoint (HF transformers format) by path or hub id.

`load_llava` returns the model (bf16 on GPU) and its processor, set for batched generation
(left padding). `build_llava` makes a small untrained one offline, of any size: a byte-level BPE
tokenizer with an `<image>` token, a CLIP vision tower and a Llama; `build_tiny` saves the tiniest.
"""
from __future__ import annotations

import torch

from tessera.models.tiny import caption_corpus, train_tokenizer

# The LLaVA-1.5 conversation format, used when a processor carries no chat template.
PROMPT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
IMAGE_TOKEN = "<image>"
# LLaVA-1.5's template, written for the tiny processor so it runs the chat-template path too.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% else %} ASSISTANT: {{ message['content'][0]['text'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def load_llava(name_or_path: str, device: str = "cpu", dtype: torch.dtype | None = None):
    """(model, processor) of a LLaVA checkpoint folder or hub id, e.g. llava-hf/llava-1.5-7b-hf."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(name_or_path)
    processor.tokenizer.padding_side = "left"  # generation continues every row from its last token
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    model = LlavaForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype or torch.float32)
    return model.eval().to(device), processor


def prompt_text(processor, prompt: str, template: str = PROMPT_TEMPLATE) -> str:
    """The text the model sees for one image and `prompt`: the chat template if it has one."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return template.format(prompt=prompt)


def build_llava(image_size: int = 32, patch: int = 8, vision_width: int = 32, vision_layers: int = 2,
                text_width: int = 64, text_layers: int = 2, feature_layer: int = -2, max_positions: int = 512,
                prompt: str = "Describe this image in as much detail as possible.", seed: int = 0):
    """An untrained LLaVA and its processor: a byte-level BPE tokenizer (trained on the captions'
    grammar and `prompt`) with an `<image>` token, a CLIP vision tower of (`image_size` / `patch`)^2
    patches and a Llama; MLPs are twice as wide as their layer, heads are 4."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )


    torch.manual_seed(seed)
    tokenizer = train_tokenizer(caption_corpus() + [f"USER: {prompt} ASSISTANT:"], vocab_size=384,
                                special_tokens=["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN],
                                pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                padding_side="left", extra_special_tokens={"image_token": IMAGE_TOKEN})
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=TINY_CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=2 * vision_width,
                              num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                              patch_size=patch, projection_dim=vision_width)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
                       num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=(image_size // patch) ** 2, vision_feature_layer=feature_layer,
                         vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config), processor


def build_tiny(path: str) -> None:
    """An untrained tiny LLaVA (32px images, 16 image tokens, 2+2 layers), saved in HF format."""
    model, processor = build_llava()
    model.save_pretrained(path)
    processor.save_pretrained(path)
