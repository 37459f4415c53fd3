"""LlamaGen's caption cleaning, written here: its outputs on captions that exercise each rule
(taken from LlamaGen's own function), applied before the text encoder when configured, and part
of the tokenize fingerprint."""
import pytest
import torch

from tessera.config.tokenize import TokenizeConfig
from tessera.models.caption_clean import cleaner, llamagen_clean
from tessera.models.refs import resolve
from tessera.models.text_encoder import TextEncoder
from tessera.pipelines.tokenize import lineage

# Input -> what LlamaGen's text_preprocessing returns for it.
LLAMAGEN_OUTPUTS = {
    "A Photo of a RED Fox in the Snow": "a photo of a red fox in the snow",
    "Two dogs on the beach https://www.example.com/img/123.jpg": "two dogs on the beach .",
    "<b>Bold</b> &amp; <i>brave</i>": "bold brave",
    "Follow @john_doe for more #12": "follow for more",
    "Tokyo 東京タワー at night": "tokyo タワー at night",
    "em—dash – en-dash": "em-dash - en-dash",
    "“Smart” ‘quotes’": "smart\" 'quotes",
    "IMG_2034.JPG sunset": "sunset",
    "this-is-my-cute-cat-photo": "this is my cute cat photo",
    "Poster 30x40 cm, free shipping!": "poster cm, !",
    "Product jc6640 page 12": "product",
    "'A quoted caption'": "a quoted caption",
    "cafÃ© au lait": "cafã au lait",
    "%20encoded+caption": "encoded caption",
    "<person> walking a dog": "person walking a dog",
    "<script>alert(1)</script>a cat": "a cat",
}


@pytest.mark.parametrize("caption", list(LLAMAGEN_OUTPUTS))
def test_cleaning_gives_llamagens_text(caption):
    assert llamagen_clean(caption) == LLAMAGEN_OUTPUTS[caption]


def test_none_leaves_captions_alone_and_unknown_names_are_refused():
    assert cleaner("none")("A RED Circle") == "A RED Circle"
    with pytest.raises(ValueError, match="unknown caption cleaning 'lower'"):
        cleaner("lower")


def test_the_encoder_sees_cleaned_captions_when_asked(tmp_path):
    path = resolve("tiny:t5", str(tmp_path))
    raw = TextEncoder.from_pretrained(path, max_length=16)
    cleaned = TextEncoder.from_pretrained(path, max_length=16, clean="llamagen")
    shouted, plain = "A RED Circle", "a red circle"
    assert not torch.equal(raw.encode([shouted])[0], raw.encode([plain])[0])  # the tokenizer is case-sensitive
    assert torch.equal(cleaned.encode([shouted])[0], raw.encode([plain])[0])


def test_cleaning_is_part_of_the_tokenize_fingerprint():
    base = TokenizeConfig(text_encoder="tiny:t5")
    assert lineage(base, "vq", "t5") != lineage(base.model_copy(update={"caption_clean": "llamagen"}), "vq", "t5")
