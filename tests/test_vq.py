import json

import pytest
import torch

from tessera.models.vq import VQ_CONFIGS, VQModel, build_tiny, load_vq
from tests.conftest import reference_file


def _reference_shapes() -> dict[str, list[int]]:
    return json.loads(reference_file("llamagen_t2i_state_dicts.json").read_text())["VQ-16"]


def test_full_vq16_has_exactly_llamagens_names_and_shapes():
    ours = {k: list(v.shape) for k, v in VQModel(VQ_CONFIGS["VQ-16"]).state_dict().items()}
    assert ours == _reference_shapes()


def test_llamagen_checkpoint_loads_strictly(tmp_path):
    # A checkpoint built from the reference names and shapes alone, as LlamaGen saves it.
    sd = {k: torch.full(shape, float(i)) for i, (k, shape) in enumerate(_reference_shapes().items())}
    path = tmp_path / "vq_ds16_t2i.pt"
    torch.save({"model": sd, "ema": sd}, path)
    model = load_vq(str(path))
    assert model.config.name == "VQ-16" and model.config.downsample == 16
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert load_vq(str(path), ema=True).config.codebook_size == 16384
    # A missing or an extra key is an error naming it.
    del sd["quant_conv.bias"]
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match="missing quant_conv.bias"):
        load_vq(str(path))
    with pytest.raises(ValueError, match="no state dict under 'ema'"):
        load_vq(str(path), ema=True)


def test_full_vq16_encodes_and_decodes_shapes():
    model = VQModel(VQ_CONFIGS["VQ-16"]).eval()
    codes = model.encode(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert codes.shape == (1, 2, 2) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 16384
    assert model.decode(codes).shape == (1, 3, 32, 32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("vq") / "tiny"
    build_tiny(str(path))
    return load_vq(str(path))


@pytest.mark.parametrize("grid", [16, 32])
def test_tiny_decode_then_encode_returns_the_codes(tiny, grid):
    size = tiny.config.codebook_size
    codes = torch.randint(0, size, (2, grid, grid), generator=torch.Generator().manual_seed(grid))
    images = tiny.decode(codes)
    assert images.shape == (2, 3, grid * 16, grid * 16)
    assert float(images.min()) >= -1 and float(images.max()) <= 1
    again = tiny.encode(images)
    assert again.shape == (2, grid, grid)
    assert torch.equal(again, codes)


def test_tiny_codes_follow_the_image_in_raster_order(tiny):
    # Left half red, right half blue: the codes differ between halves, agree within them.
    img = torch.full((1, 3, 256, 256), -0.8)
    img[0, 0, :, :128] = 0.9
    img[0, 2, :, 128:] = 0.9
    codes = tiny.encode(img)[0]
    assert codes.shape == (16, 16)
    assert (codes[:, :8] == codes[0, 0]).all() and (codes[:, 8:] == codes[0, 15]).all()
    assert codes[0, 0] != codes[0, 15]
    assert int(codes.max()) < tiny.config.codebook_size
    # The decoded image keeps the colours where they were.
    out = tiny.decode(codes[None])[0]
    assert out[0, :, :128].mean() > out[2, :, :128].mean()
    assert out[2, :, 128:].mean() > out[0, :, 128:].mean()


def test_unknown_config_and_bad_input_are_clear_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown VQ config"):
        load_vq(str(tmp_path), config="VQ-99")
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny.encode(torch.zeros(1, 3, 40, 40))
