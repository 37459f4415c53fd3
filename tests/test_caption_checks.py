"""Output checks on generated captions, the fallback they lead to, and the vLLM request/response mapping."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from tessera.config.caption import CaptionConfig
from tessera.pipelines import caption, vllm_backend
from tessera.pipelines.caption_checks import check, first_sentence

PROMPT = "Describe this image in as much detail as possible."
GOOD = "A red circle sits on a blue background. Its edge is soft and slightly blurred."


@pytest.mark.parametrize("text, reason", [
    (GOOD, ""),
    ("", "empty"),
    ("  \n ... ", "empty"),
    ("A red circle\x00 on blue.", "non_printable"),
    ("A red \ufffd circle.", "non_printable"),
    ("Describe this image in as much detail as possible.", "prompt_echo"),
    ("USER: what is this? ASSISTANT: a dog", "prompt_echo"),
    ("a red circle a red circle a red circle a red circle on blue", "repetition"),
    ("A circle @@@@@@@@@@@@", "repetition"),
    ("the the the the the the the", "repetition"),
    ("possIzu possIzu possIzu", "repetition"),
    ("A red circle sits on a blue background, and a small shadow falls to the right of it.", ""),
])
def test_check_gives_each_degenerate_output_its_reason(text, reason):
    assert check(text, PROMPT) == reason


def test_first_sentence_is_the_short_caption():
    assert first_sentence(GOOD) == "A red circle sits on a blue background."
    assert first_sentence("no full stop here") == "no full stop here"
    assert first_sentence("Is it red? Yes.") == "Is it red?"
    assert first_sentence("  ") == ""


def test_finish_caption_falls_back_to_the_original_with_the_reason():
    cfg = CaptionConfig()
    assert caption.finish_caption(f"  {GOOD} ", "orig. caption", "", cfg) == (GOOD, first_sentence(GOOD), "")
    assert caption.finish_caption(PROMPT, "Orig caption. More.", "", cfg) == \
        ("Orig caption. More.", "Orig caption.", "prompt_echo")
    assert caption.finish_caption(None, "orig", "corrupt_image", cfg) == ("orig", "orig", "corrupt_image")


class FakeCaptioner:
    """Answers from a table; a key mapped to an exception fails any batch it is in."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def generate(self, images, keys):
        self.calls.append(list(keys))
        for k in keys:
            if isinstance(self.answers[k], Exception):
                raise self.answers[k]
        return [self.answers[k] for k in keys]


def test_actor_maps_each_sample_to_one_caption_or_one_reason(monkeypatch):
    import io

    from PIL import Image

    jpg = io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(jpg, "JPEG")
    fake = FakeCaptioner({"a": GOOD, "b": PROMPT, "c": RuntimeError("CUDA error"), "e": "x x x x x x x x x x"})
    monkeypatch.setattr(caption, "make_captioner", lambda *a: fake)
    work = caption.CaptionShard(CaptionConfig(), "unused", "cpu", {})
    images = [jpg.getvalue()] * 3 + [b"not a jpeg", jpg.getvalue()]
    out = work.caption_batch([{"key": k, "image": img, "caption": f"original {k}. more"}
                              for k, img in zip("abcde", images)])
    assert [r["fallback_reason"] for r in out] == ["", "prompt_echo", "generation_error", "corrupt_image", "repetition"]
    assert [r["caption_long"] for r in out] == [GOOD, "original b. more", "original c. more", "original d. more",
                                                "original e. more"]
    assert [r["caption_short"] for r in out] == [first_sentence(GOOD), "original b.", "original c.", "original d.",
                                                 "original e."]
    # The failed batch was retried one image at a time; the corrupt image never reached the model.
    assert fake.calls[0] == ["a", "b", "c", "e"] and ["a"] in fake.calls and "d" not in sum(fake.calls, [])


def test_generation_settings_name_what_decides_the_captions():
    greedy = caption.generation_settings(CaptionConfig(), "cuda")
    assert greedy == {"backend": "transformers", "max_new_tokens": 256, "do_sample": False, "dtype": "bfloat16",
                      "batch_size": 8}
    sampled = caption.generation_settings(CaptionConfig(do_sample=True, temperature=0.7, seed=3), "cpu")
    assert sampled["dtype"] == "float32" and (sampled["temperature"], sampled["seed"]) == (0.7, 3)


# vLLM ------------------------------------------------------------------------------------------
def test_vllm_requests_carry_the_templated_prompt_and_the_image():
    cfg = CaptionConfig(prompt="Say what you see.")
    images = [object(), object()]
    requests = vllm_backend.build_requests(cfg, images, ["k0", "k1"])
    assert [r["prompt"] for r in requests] == ["USER: <image>\nSay what you see. ASSISTANT:"] * 2
    assert [r["multi_modal_data"]["image"] for r in requests] == images


def test_vllm_sampling_is_greedy_or_seeded_per_sample():
    greedy = vllm_backend.sampling_kwargs(CaptionConfig(max_new_tokens=77), "k")
    assert greedy == {"max_tokens": 77, "temperature": 0.0, "top_p": 1.0}
    cfg = CaptionConfig(do_sample=True, temperature=0.8, top_p=0.9, seed=5)
    a, b = vllm_backend.sampling_kwargs(cfg, "k0"), vllm_backend.sampling_kwargs(cfg, "k1")
    assert (a["temperature"], a["top_p"]) == (0.8, 0.9)
    assert a["seed"] != b["seed"] and a == vllm_backend.sampling_kwargs(cfg, "k0")
    engine = vllm_backend.engine_kwargs(CaptionConfig(tensor_parallel_size=2), "/m")
    assert engine["dtype"] == "bfloat16" and engine["tensor_parallel_size"] == 2 and engine["model"] == "/m"


def test_vllm_responses_map_to_texts_in_request_order():
    outputs = [SimpleNamespace(outputs=[SimpleNamespace(text=" A dog.")]), SimpleNamespace(outputs=[]),
               SimpleNamespace(outputs=[SimpleNamespace(text="A cat."), SimpleNamespace(text="other")])]
    assert vllm_backend.map_responses(outputs) == [" A dog.", "", "A cat."]


def test_vllm_selected_but_missing_is_a_clear_error(monkeypatch, tmp_path):
    from tessera.config.ray import RayConfig
    from tessera.core.store import ShardStore
    from tests.fixtures import write_download_shard, write_selection

    store = ShardStore(str(tmp_path / "data"))
    write_selection(store, "00000", write_download_shard(store, "00000", n=2), [True, True])
    monkeypatch.setattr(vllm_backend, "vllm", None)
    with pytest.raises(ImportError, match="vLLM is not installed.*caption.backend: transformers"):
        caption.run(CaptionConfig(backend="vllm"), RayConfig(), store, str(tmp_path / "models"))
    assert not store.exists("captions")


def test_pool_size_is_one_actor_per_gpu_or_per_cpu_slot(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 8.0})
    assert caption.num_actors(CaptionConfig(num_gpus_per_actor=1)) == 8
    assert caption.num_actors(CaptionConfig(num_gpus_per_actor=2)) == 4
    assert caption.num_actors(CaptionConfig(num_cpus_per_actor=2)) == 8  # each actor reads its own shards
    assert caption.num_actors(CaptionConfig(num_actors=3, num_gpus_per_actor=1)) == 3
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    assert caption.num_actors(CaptionConfig()) == 1
