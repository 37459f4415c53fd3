import numpy as np
import pytest
import torch

from tessera.config.train import CodesDataConfig
from tessera.core.token_shards import ShardIndex, decode_npy, index_members, write_codes_shard
from tessera.demo.codes import write_synthetic_codes
from tessera.models.generation import left_pad
from tessera.training.data import REMOTE_READ_THREADS, CodesLoader
from tessera.core.store import ShardStore


class CharEncoder:
    """A stand-in text encoder: one feature row per character, so a caption is recognisable."""

    dim = 4

    def __init__(self):
        self.seen: list[str] = []

    def encode(self, captions):
        self.seen += captions
        return [torch.tensor([[float(ord(ch)), 0, 0, 1] for ch in c]) for c in captions]


@pytest.fixture
def store(tmp_path):
    s = ShardStore(str(tmp_path / "data"))
    write_synthetic_codes(s, 256, shards=3, per_shard=7, vocab=64, caption_dim=8)
    return s


def _loader(store, batch=4, prefetch=0, **cfg):
    return CodesLoader(store, CodesDataConfig(**cfg), batch, prefetch=prefetch)


def _take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def _same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_batches_have_the_training_layout(store):
    batch = _loader(store).next_batch()
    assert batch["codes"].shape == (4, 256) and batch["codes"].dtype == torch.long
    assert batch["cond"].shape == (4, 120, 8) and batch["cond_mask"].shape == (4, 120)
    lengths = batch["cond_mask"].sum(1)
    assert all(3 <= n <= 6 for n in lengths.tolist()) and batch["valid"].all()
    # Left padding: the real features sit at the end, zeros before them.
    assert batch["cond_mask"][:, -1].all() and not batch["cond_mask"][:, 0].any()
    assert torch.all(batch["cond"][~batch["cond_mask"]] == 0)


def test_order_is_a_function_of_the_seed(store):
    a, b = _take(_loader(store), 6), _take(_loader(store), 6)
    c = _take(_loader(store, seed=1), 6)
    assert _same(a, b) and not _same(a, c)
    # 21 samples, batches of 4: the sixth batch crosses into epoch 1, reshuffled.
    loader = _loader(store)
    _take(loader, 6)
    assert loader.state_dict()["epoch"] == 1


@pytest.mark.parametrize("prefetch,threads", [(0, 1), (2, 1), (2, 4)])
def test_restored_position_continues_the_stream_exactly(store, prefetch, threads):
    reference = _take(_loader(store), 9)
    first = _loader(store, prefetch=prefetch, read_threads=threads)
    _take(first, 4)
    state = first.state_dict()
    first.close()
    resumed = _loader(store, prefetch=prefetch, read_threads=threads)
    resumed.load_state_dict(state)
    assert _same(_take(resumed, 5), reference[4:])
    resumed.close()


def test_workers_split_each_global_batch(store):
    whole = _take(_loader(store, batch=6, flip_prob=0.5), 3)
    parts = [_take(CodesLoader(store, CodesDataConfig(flip_prob=0.5), 6, rank=r, world=2, prefetch=0), 3)
             for r in range(2)]
    for i in range(3):
        for k in whole[i]:
            assert torch.equal(torch.cat([parts[0][i][k], parts[1][i][k]]), whole[i][k])


def test_an_object_store_is_read_on_several_threads_and_gives_the_same_batches(store, tmp_path):
    remote = ShardStore(f"memory://{tmp_path.name}/data")
    write_synthetic_codes(remote, 256, shards=3, per_shard=7, vocab=64, caption_dim=8)
    threaded = CodesLoader(remote, CodesDataConfig(flip_prob=0.5), 6, rank=1, world=2, prefetch=2)
    assert threaded.read_threads == REMOTE_READ_THREADS and _loader(store).read_threads == 1
    local = CodesLoader(store, CodesDataConfig(flip_prob=0.5, read_threads=1), 6, rank=1, world=2, prefetch=0)
    assert _same(_take(threaded, 5), _take(local, 5))
    threaded.close()
    remote.fs.rm(remote.root, recursive=True)


def _numbered_shard(store, n=12, bad=()):
    """Samples whose codes carry their number (so batches show which samples they hold); the
    samples numbered in `bad` have a 512px grid in the 256px folder."""
    samples = [{"key": f"k{i:03d}", "codes": np.full((32, 32) if i in bad else (16, 16), i), "t5": np.ones((2, 4)),
                "meta": {"caption": "x"}} for i in range(n)]
    write_codes_shard(store, 256, "00000", samples)


def test_each_worker_reads_its_own_slice_only(tmp_path):
    s = ShardStore(str(tmp_path / "d"))
    _numbered_shard(s, 12)
    whole = _loader(s, batch=12).next_batch()["codes"][:, 0].tolist()
    _numbered_shard(s, 12, bad=set(whole[6:]))  # every sample of worker 1's slice is unusable
    loaders = [CodesLoader(s, CodesDataConfig(), 12, rank=r, world=2, prefetch=0) for r in range(2)]
    first, second = (loader.next_batch() for loader in loaders)
    # Worker 0 never read worker 1's samples, so it found nothing wrong; worker 1 kept their places.
    assert first["codes"][:, 0].tolist() == whole[:6] and first["valid"].all() and not loaders[0].skipped
    assert dict(loaders[1].skipped) == {"wrong_grid": 6} and not second["valid"].any()
    # Both stand at the same position of the stream: the global batch's end.
    single = _loader(s, batch=12)
    single.next_batch()
    assert loaders[0].state_dict() == loaders[1].state_dict() == single.state_dict()


def test_captions_are_encoded_when_features_are_not_stored(tmp_path):
    s = ShardStore(str(tmp_path / "d"))
    write_synthetic_codes(s, 256, shards=1, per_shard=5, stored_features=False)
    enc = CharEncoder()
    batch = CodesLoader(s, CodesDataConfig(), 5, text_encoder=enc, prefetch=0).next_batch()
    assert batch["cond"].shape == (5, 120, 4)
    assert len(enc.seen) == 5 and all(c.startswith("pattern number") for c in enc.seen)
    assert batch["cond_mask"].sum(1).tolist() == [len(c) for c in enc.seen]
    with pytest.raises(RuntimeError, match="no text encoder"):
        CodesLoader(s, CodesDataConfig(), 5, prefetch=0).next_batch()


def _captioned_shard(store, n=40):
    rng = np.random.default_rng(0)
    samples = [{"key": f"k{i:03d}", "codes": rng.integers(0, 16, (16, 16)), "t5": np.ones((3, 4)),
                "meta": {"key": f"k{i:03d}", "caption": "orig", "caption_long": "a long caption",
                         "caption_short": "short"}} for i in range(n)]
    write_codes_shard(store, 256, "00000", samples)


def test_short_caption_substitution(tmp_path):
    s = ShardStore(str(tmp_path / "d"))
    _captioned_shard(s)
    enc = CharEncoder()
    loader = CodesLoader(s, CodesDataConfig(short_caption_prob=0.3), 40, text_encoder=enc, prefetch=0)
    batch = loader.next_batch()
    # Substituted captions are encoded on the fly; the others use the stored features.
    assert set(enc.seen) == {"short"} and 4 <= len(enc.seen) <= 20
    assert (batch["cond_mask"].sum(1) == 5).sum() == len(enc.seen)
    assert (batch["cond_mask"].sum(1) == 3).sum() == 40 - len(enc.seen)
    enc2 = CharEncoder()
    CodesLoader(s, CodesDataConfig(short_caption_prob=0.3, text="encode"), 40, text_encoder=enc2,
                prefetch=0).next_batch()
    assert enc2.seen.count("short") == len(enc.seen) and enc2.seen.count("a long caption") == 40 - len(enc.seen)


def test_bad_samples_are_skipped_and_counted(tmp_path):
    s = ShardStore(str(tmp_path / "d"))
    samples = [{"key": f"k{i}", "codes": np.zeros((16, 16)), "t5": np.ones((2, 4)), "meta": {"caption": "x"}}
               for i in range(4)]
    samples[1]["codes"] = np.zeros((32, 32))  # a 512px sample in the 256px folder
    samples[2]["t5"] = None
    write_codes_shard(s, 256, "00000", samples)
    loader = CodesLoader(s, CodesDataConfig(text="stored"), 4, prefetch=0)
    batch = loader.next_batch()
    assert dict(loader.skipped) == {"wrong_grid": 1, "no_stored_features": 1}
    # Their places stay in the batch, as rows the loss does not count.
    assert batch["valid"].sum() == 2 and not batch["cond_mask"][~batch["valid"]].any()
    assert not batch["codes"][~batch["valid"]].any()


def test_the_member_index_is_written_once_and_read_instead_of_the_headers(tmp_path):
    s = ShardStore(str(tmp_path / "d"))
    _numbered_shard(s, 5)
    assert s.marker_info("tokens/256", "00000")["index"] == "00000.index.json"
    index = ShardIndex(s, "tokens/256", "00000", s.marker_info("tokens/256", "00000")["bytes"])
    assert not index.from_headers
    with s.fs.open(s.path("tokens/256", "00000.tar"), "rb") as f:
        assert index.members == index_members(f, "00000.tar")
    assert decode_npy(index.read_sample("k003")["codes.npy"])[0, 0] == 3
    fresh = _loader(s, batch=5)
    fresh.next_batch()
    assert fresh.header_reads == 0
    # An index that does not match the tar (rewritten without it) is not trusted.
    stale = s.read_json("tokens/256", "00000.index.json")
    _numbered_shard(s, 7)
    s.write_json(stale, "tokens/256", "00000.index.json")
    loader = _loader(s, batch=7)
    assert sorted(loader.next_batch()["codes"][:, 0].tolist()) == list(range(7))
    assert loader.header_reads == 1


def test_no_shards_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the tokenize stage"):
        CodesLoader(ShardStore(str(tmp_path)), CodesDataConfig(), 2, prefetch=0).next_batch()


def test_flipped_codes_are_used_with_their_probability(store):
    plain = _loader(store, batch=8).next_batch()["codes"].view(8, 16, 16)
    flipped = _loader(store, batch=8, flip_prob=1.0).next_batch()["codes"].view(8, 16, 16)
    assert torch.equal(flipped, plain.flip(-1))


def test_left_pad_truncates_to_120():
    cond, mask = left_pad([torch.ones(130, 2), torch.ones(0, 2)], 2)
    assert mask[0].all() and not mask[1].any()


def test_batches_are_padded_to_the_models_text_prefix(store):
    """A model with a shorter text prefix (the demo's) gets its features left-padded to that length."""
    batch = CodesLoader(store, CodesDataConfig(), 4, prefetch=0, text_positions=8).next_batch()
    assert batch["cond"].shape == (4, 8, 8) and batch["cond_mask"].shape == (4, 8)
    real = batch["cond_mask"].sum(1)
    assert (real > 0).all() and batch["cond_mask"][:, -1].all()  # real tokens sit at the right


def test_code_noise_replaces_a_share_of_the_inputs_and_never_the_targets(store):
    clean = _take(_loader(store, batch=8), 3)
    noisy_loader = CodesLoader(store, CodesDataConfig(code_noise=0.25), 8, prefetch=0, vocab_size=64)
    noisy = _take(noisy_loader, 3)
    for c, n in zip(clean, noisy):
        assert torch.equal(c["codes"], n["codes"]) and "inputs" not in c
        changed = (n["inputs"] != n["codes"]).float().mean().item()
        # A random code equals the true one 1 time in 64, so slightly under a quarter change.
        assert 0.18 < changed < 0.3
        assert n["inputs"].min() >= 0 and n["inputs"].max() < 64
    # The noise is part of the stream: a restored loader draws the same replacements.
    state = noisy_loader.state_dict()
    following = _take(noisy_loader, 2)
    resumed = CodesLoader(store, CodesDataConfig(code_noise=0.25), 8, prefetch=0, vocab_size=64)
    resumed.load_state_dict(state)
    assert _same(_take(resumed, 2), following)


def test_code_noise_needs_the_codebook_size(store):
    with pytest.raises(ValueError, match="vocab_size"):
        CodesLoader(store, CodesDataConfig(code_noise=0.1), 4, prefetch=0)
    with pytest.raises(ValueError, match="code_noise"):
        CodesDataConfig(code_noise=1.5)
