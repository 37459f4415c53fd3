"""The vLLM captioning backend (caption.backend: vllm), used where vLLM is installed.

vLLM is an optional dependency (`pip install vllm` on the GPU nodes). The request building and
response mapping are plain functions, so they are tested where vLLM is absent.
"""
from __future__ import annotations

import zlib

from tessera.config.caption import CaptionConfig

try:  # optional: only the GPU image carries it
    import vllm
except ImportError:  # pragma: no cover - depends on the environment
    vllm = None


def require_vllm():
    if vllm is None:
        raise ImportError("caption.backend is 'vllm' but vLLM is not installed: `pip install vllm` on the "
                          "GPU nodes, or set caption.backend: transformers")
    return vllm


def sample_seed(cfg: CaptionConfig, key: str) -> int:
    """Each sample's own seed: sampled captions do not depend on how samples were batched."""
    return (cfg.seed + zlib.crc32(key.encode())) % (2 ** 31)


def sampling_kwargs(cfg: CaptionConfig, key: str) -> dict:
    """vllm.SamplingParams arguments for one sample (temperature 0 is greedy in vLLM)."""
    kwargs = {"max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature if cfg.do_sample else 0.0,
              "top_p": cfg.top_p if cfg.do_sample else 1.0}
    if cfg.do_sample:
        kwargs["seed"] = sample_seed(cfg, key)
    return kwargs


def build_requests(cfg: CaptionConfig, images: list, keys: list[str]) -> list[dict]:
    """One vLLM prompt per image: the prompt template around the config's prompt, and the image."""
    text = cfg.prompt_template.format(prompt=cfg.prompt)
    return [{"prompt": text, "multi_modal_data": {"image": image}} for image, key in zip(images, keys)]


def map_responses(outputs) -> list[str]:
    """The generated text of each vLLM RequestOutput, in request order ("" when it has none)."""
    texts = []
    for out in outputs:
        completions = getattr(out, "outputs", None) or []
        texts.append(completions[0].text if completions else "")
    return texts


def engine_kwargs(cfg: CaptionConfig, model_path: str) -> dict:
    return {"model": model_path, "dtype": "bfloat16" if cfg.precision == "bf16" else "float32",
            "tensor_parallel_size": cfg.tensor_parallel_size, "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "seed": cfg.seed, "limit_mm_per_prompt": {"image": 1}}


class VllmCaptioner:
    """A vLLM engine on this actor's GPU(s); same interface as the transformers captioner."""

    def __init__(self, cfg: CaptionConfig, model_path: str):
        v = require_vllm()
        self.cfg = cfg
        self.engine = v.LLM(**engine_kwargs(cfg, model_path))

    def generate(self, images: list, keys: list[str]) -> list[str]:
        params = [vllm.SamplingParams(**sampling_kwargs(self.cfg, k)) for k in keys]
        outputs = self.engine.generate(build_requests(self.cfg, images, keys), params, use_tqdm=False)
        return map_responses(outputs)
