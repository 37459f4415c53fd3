import json

import pytest
import torch

from tessera.models.gpt import (GPT, GPT_CONFIGS, build_gpt, extract_state_dict, gpt_config, load_weights,
                                read_checkpoint, rope_2d)
from tests.conftest import reference_file


pytestmark = pytest.mark.usefixtures("one_thread")


def _reference() -> dict:
    return json.loads(reference_file("llamagen_t2i_state_dicts.json").read_text())


@pytest.mark.parametrize("name", ["GPT-B", "GPT-L", "GPT-XL"])
def test_parameter_names_and_shapes_match_llamagen(name):
    ref = _reference()[f"{name}-t2i"]
    model = build_gpt(name, device="meta")
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref


def test_full_size_xl_checkpoint_loads_strictly_from_a_torch_save_file(tmp_path):
    """A file in LlamaGen's format (weights under `model`, saved with torch.save) with exactly the
    reference names and shapes; each tensor is a broadcast view of one value, so the file is small."""
    ref = _reference()["GPT-XL-t2i"]
    state = {k: torch.zeros(1, dtype=torch.bfloat16).expand(*shape) for k, shape in ref.items()}
    path = tmp_path / "t2i_XL_stage1_256.pt"
    torch.save({"model": state, "optimizer": {}, "steps": 1}, path)
    model = build_gpt("GPT-XL", device="meta")
    load_weights(model, str(path))  # strict: raises on any missing or unexpected name or shape

    state.pop("norm.weight")
    torch.save({"model": state}, path)
    with pytest.raises(RuntimeError, match="norm.weight"):
        load_weights(build_gpt("GPT-XL", device="meta"), str(path))


@pytest.mark.parametrize("key", ["model", "module", "state_dict", None])
def test_checkpoint_keys_and_wrapper_prefixes(tmp_path, key):
    model = build_gpt("GPT-nano", grid=2)
    state = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save(state if key is None else {key: state, "args": {"lr": 1.0}}, tmp_path / "c.pt")
    other = load_weights(build_gpt("GPT-nano", grid=2), str(tmp_path / "c.pt"))
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v)


class Evil:
    pass


def test_pickled_objects_are_refused_but_saved_args_are_fine(tmp_path):
    import argparse

    model = build_gpt("GPT-nano", grid=2)
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1e-4)}, tmp_path / "ok.pt")
    load_weights(build_gpt("GPT-nano", grid=2), str(tmp_path / "ok.pt"))
    torch.save({"model": {"w": torch.zeros(1)}, "obj": Evil()}, tmp_path / "bad.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported"):
        read_checkpoint(str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="no state dict"):
        extract_state_dict({"optimizer": {}})


def test_ffn_sizes_and_configs_are_data():
    assert GPT_CONFIGS["GPT-B"].ffn_hidden == 2048
    assert GPT_CONFIGS["GPT-XL"].ffn_hidden == 3584
    assert gpt_config("GPT-XL", vocab_size=None).vocab_size == 16384
    assert GPT_CONFIGS["GPT-XL"].text_rope == "identity"
    with pytest.raises(ValueError, match="unknown GPT config"):
        gpt_config("GPT-XS")


def test_rope_table_text_modes_and_2d_layout():
    llamagen = rope_2d(4, 16, 10000, 3, "llamagen")
    identity = rope_2d(4, 16, 10000, 3, "identity")
    assert llamagen.shape == (3 + 16, 8, 2)
    assert torch.all(llamagen[:3] == 0)
    assert torch.all(identity[:3, :, 0] == 1) and torch.all(identity[:3, :, 1] == 0)
    assert torch.equal(llamagen[3:], identity[3:])
    image = identity[3:].view(4, 4, 8, 2)
    # Row frequencies in the first half of the pairs, column frequencies in the second.
    assert torch.allclose(image[1, 0, :4], image[1, 3, :4]) and not torch.allclose(image[0, 0, :4], image[1, 0, :4])
    assert torch.allclose(image[0, 2, 4:], image[3, 2, 4:]) and not torch.allclose(image[0, 0, 4:], image[0, 1, 4:])
    assert torch.allclose(image[0, 0, :, 0], torch.ones(8))  # position (0, 0) is not rotated


def test_rope_grid_interpolates_a_larger_grid_between_the_first_grids_positions():
    first = rope_2d(4, 16, 10000, 3, "identity")[3:].view(4, 4, 8, 2)
    larger = rope_2d(8, 16, 10000, 3, "identity", rope_grid=4)[3:].view(8, 8, 8, 2)
    assert torch.allclose(larger[::2, ::2], first, atol=1e-6)  # (2i, 2j) is the first grid's (i, j)
    half_a_row = rope_2d(8, 16, 10000, 3, "identity")[3:].view(8, 8, 8, 2)[1, 0]
    assert not torch.allclose(larger[1, 0], first[1, 0]) and not torch.allclose(larger[1, 0], half_a_row)
    model = build_gpt("GPT-nano", grid=4, rope_grid=2)
    assert torch.allclose(model.rope[120:].view(4, 4, -1, 2)[::2, ::2],
                          build_gpt("GPT-nano", grid=2).rope[120:].view(2, 2, -1, 2), atol=1e-6)


def _batch(model: GPT, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(b, 120, model.cfg.caption_dim, generator=g)
    mask = torch.zeros(b, 120, dtype=torch.bool)
    mask[0, -5:] = True
    mask[1, -9:] = True
    codes = torch.randint(0, model.cfg.vocab_size, (b, model.num_image_tokens), generator=g)
    return cond, mask, codes


def _eval_model(**overrides) -> GPT:
    torch.manual_seed(0)
    model = build_gpt("GPT-nano", grid=3, **overrides)
    torch.nn.init.normal_(model.output.weight, std=0.02)  # zero-init head would hide differences
    return model.eval()


def test_forward_scores_every_image_token_after_the_prefix():
    model = _eval_model()
    cond, mask, codes = _batch(model)
    logits = model(codes[:, :-1], cond, mask)
    assert logits.shape == (2, 9, model.cfg.vocab_size)
    # Causality: changing a later code does not change earlier predictions.
    changed = codes.clone()
    changed[:, 5] = (changed[:, 5] + 1) % model.cfg.vocab_size
    assert torch.allclose(model(changed[:, :-1], cond, mask)[:, :6], logits[:, :6], atol=1e-6)
    assert not torch.allclose(model(changed[:, :-1], cond, mask)[:, 6:], logits[:, 6:], atol=1e-6)


@pytest.mark.parametrize("text_rope", ["identity", "llamagen"])
def test_padded_text_positions_are_invisible(text_rope):
    model = _eval_model(text_rope=text_rope)
    cond, mask, codes = _batch(model)
    logits = model(codes[:, :-1], cond, mask)
    noisy = cond.clone()
    noisy[~mask] = torch.randn_like(noisy[~mask]) * 10
    assert torch.allclose(model(codes[:, :-1], noisy, mask)[:, 1:], logits[:, 1:], atol=1e-5)
    real = cond.clone()
    real[mask] += 1.0
    assert not torch.allclose(model(codes[:, :-1], real, mask), logits, atol=1e-4)


def test_cfg_dropout_replaces_the_caption_with_the_uncond_embedding():
    model = _eval_model()
    cond, mask, codes = _batch(model)
    dropped = torch.tensor([True, False])
    a = model(codes[:, :-1], cond, None, drop_cond=dropped)
    b = model(codes[:, :-1], torch.randn_like(cond), None, drop_cond=dropped)
    assert torch.allclose(a[0], b[0], atol=1e-6) and not torch.allclose(a[1], b[1], atol=1e-4)
    # In training, about `class_dropout` of the captions are dropped (torch RNG, so resumable).
    model.train()
    model.cls_embedding.drop = 1.0
    torch.manual_seed(1)
    emb = model.cls_embedding(cond)
    assert torch.allclose(emb[0], emb[1])
    assert "cls_embedding.uncond_embedding" in model.state_dict()
    assert not any(n.endswith("uncond_embedding") for n, _ in model.named_parameters())


def test_grid_grows_without_new_parameters():
    small = build_gpt("GPT-nano", grid=2)
    big = build_gpt("GPT-nano", grid=4)
    big.load_state_dict(small.state_dict(), strict=True)
    assert big.rope.shape[0] == 120 + 16 and "rope" not in big.state_dict()
    cond = torch.randn(1, 120, 32)
    assert big.eval()(torch.zeros(1, 15, dtype=torch.long), cond).shape == (1, 16, 256)
    with pytest.raises(ValueError, match="longer than"):
        small(torch.zeros(1, 15, dtype=torch.long), cond)


def test_output_head_is_zero_initialised():
    model = build_gpt("GPT-nano", grid=2)
    assert torch.all(model.output.weight == 0)
    assert 0.015 < model.tok_embeddings.weight.std() < 0.025


def test_llamagen_configs_keep_the_120_position_text_prefix_and_the_demo_config_a_short_one():
    for name in ("GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-3B"):
        assert GPT_CONFIGS[name].cls_token_num == 120, name
    model = build_gpt("GPT-demo", grid=4).eval()
    assert model.rope.shape[0] == 24 + 16
    cond = torch.randn(2, 24, model.cfg.caption_dim)
    mask = torch.zeros(2, 24, dtype=torch.bool)
    mask[:, -5:] = True
    idx = torch.randint(0, model.cfg.vocab_size, (2, 15))
    assert model(idx, cond, mask).shape == (2, 16, model.cfg.vocab_size)
