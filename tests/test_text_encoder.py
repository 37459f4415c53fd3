import pytest
import torch

from tessera.models.text_encoder import TextEncoder, build_tiny


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5") / "t5"
    build_tiny(str(path))
    return TextEncoder.from_pretrained(str(path), max_length=12)


def test_features_have_no_padding_and_respect_max_length(encoder):
    captions = ["a red circle", "a blue square on the left on a white background " * 5, ""]
    feats = encoder.encode(captions)
    assert encoder.dim == 32
    assert [f.dtype for f in feats] == [torch.float32] * 3
    assert all(f.ndim == 2 and f.shape[1] == encoder.dim for f in feats)
    lengths = [f.shape[0] for f in feats]
    assert lengths[2] >= 1                    # an empty caption still has its end token
    assert lengths[0] < lengths[1] == 12      # long captions are cut at max_length
    # Padding does not leak: a caption encodes the same alone and next to a long one.
    alone = encoder.encode(["a red circle"])[0]
    assert alone.shape == feats[0].shape
    assert torch.allclose(alone, feats[0], atol=1e-5)


def test_different_captions_give_different_features(encoder):
    a, b = encoder.encode(["a red circle", "a green cross"])
    assert not torch.allclose(a[: min(len(a), len(b))], b[: min(len(a), len(b))])
    assert encoder.encode([]) == []


def test_a_colour_word_says_whether_it_names_the_shape_or_the_background(encoder):
    """The tiny encoder is random but contextual: "red" as the shape's colour and "red" as the
    background's get different features (a random T5's attention would average them together)."""
    long = TextEncoder(encoder.model, encoder.tokenizer, max_length=32)
    a, b = long.encode(["a red circle in the center on a blue background",
                        "a blue circle in the center on a red background"])
    ids = long.tokenizer("a red circle in the center on a blue background")["input_ids"]
    words = long.tokenizer.convert_ids_to_tokens(ids)
    shape_colour, background = words.index("Ġred"), words.index("Ġblue")
    same_word = torch.nn.functional.cosine_similarity(a[shape_colour], b[background], dim=0)
    assert same_word < 0.8
