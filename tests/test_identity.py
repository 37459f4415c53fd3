"""A model's text_rope and rope_grid travel with its weights: init_from adopts them, a config that
contradicts them is refused, exports carry them (and refuse what LlamaGen's code would compute
differently), and optimizer state exports in LlamaGen's layout."""
import argparse
import json

import pytest
import torch

from tessera.config import RunConfig
from tessera.core.store import ShardStore
from tessera.demo.codes import write_synthetic_codes
from tessera.models.gpt import build_gpt, llamagen_parameter_order
from tessera.models.identity import (
    Identity,
    IdentityMismatch,
    identity_of,
    resolution_of,
    settle,
)
from tessera.pipelines import train
from tessera.pipelines.sample import load_generator
from tessera.training.checkpoint import ExportRefused, export, read_checkpoint_any
from tests.conftest import reference_file

TINY = {"model": "GPT-nano", "vocab_size": 64, "global_batch": 4, "use_ray": False, "log_every": 1,
        "max_steps": 1, "optim": {"lr_per_256": 0.0}}

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, **stage1) -> RunConfig:
    return RunConfig.model_validate({
        "name": "t", "data_root": str(tmp_path / "data"), "runs_root": str(tmp_path / "runs"),
        "models_root": str(tmp_path / "models"), "source": {"path": str(tmp_path / "src.parquet")},
        "stage1": {**TINY, **stage1}})


@pytest.fixture
def data(tmp_path):
    store = ShardStore(str(tmp_path / "data"))
    write_synthetic_codes(store, 256, shards=1, per_shard=4, vocab=64, caption_dim=32)
    return store


def _llamagen_file(tmp_path, name: str = "t2i_nano_stage1_256.pt") -> str:
    """A tiny generator saved as LlamaGen's trainer saves one: weights under `model`, no config."""
    torch.manual_seed(3)
    model = build_gpt("GPT-nano", vocab_size=64, text_rope="llamagen")
    torch.nn.init.normal_(model.output.weight, std=0.02)
    path = tmp_path / name
    torch.save({"model": model.state_dict(), "steps": 7, "args": argparse.Namespace(image_size=256)}, path)
    return str(path)


def test_a_llamagen_checkpoint_trains_in_llamagen_mode_without_being_told(tmp_path, data):
    source = _llamagen_file(tmp_path)
    result = train.run(_config(tmp_path, init_from=source), "stage1")
    saved = read_checkpoint_any(result.checkpoint)
    assert saved["config"]["model_config"]["text_rope"] == "llamagen"
    assert saved["config"]["model_config"]["rope_grid"] is None
    start = torch.load(source, weights_only=False)["model"]
    for name, tensor in start.items():  # lr 0: the weights are LlamaGen's
        assert torch.equal(saved["model"][name], tensor), name


def test_a_mode_that_contradicts_the_weights_is_refused_in_one_line_unless_overridden(tmp_path, data):
    source = _llamagen_file(tmp_path)
    with pytest.raises(IdentityMismatch) as refused:
        train.run(_config(tmp_path, init_from=source, text_rope="identity"), "stage1")
    assert "\n" not in str(refused.value) and "'llamagen'" in str(refused.value)
    assert ShardStore(str(tmp_path / "runs")).list("t/stage1/checkpoints") == []
    result = train.run(_config(tmp_path, init_from=source, text_rope="identity", identity_override=True), "stage1")
    assert read_checkpoint_any(result.checkpoint)["config"]["model_config"]["text_rope"] == "identity"


def test_a_resumed_stage_keeps_its_own_mode(tmp_path, data):
    first = train.run(_config(tmp_path), "stage1")  # from scratch: identity
    assert read_checkpoint_any(first.checkpoint)["config"]["model_config"]["text_rope"] == "identity"
    with pytest.raises(IdentityMismatch, match="this stage's checkpoint"):
        train.run(_config(tmp_path, text_rope="llamagen", max_steps=2), "stage1")
    resumed = train.run(_config(tmp_path, max_steps=2), "stage1")
    assert resumed.step == 2


def test_rope_grid_adopts_the_source_and_refuses_another_span():
    stage1 = Identity("identity", None, 256, "tessera")
    assert settle(None, None, stage1) == ("identity", None)
    assert settle(None, 16, stage1) == ("identity", 16)  # the source's own 16x16 grid
    with pytest.raises(IdentityMismatch, match="16x16"):
        settle(None, 8, stage1)
    interpolated = Identity("identity", 16, 512, "tessera")
    assert settle(None, None, interpolated) == ("identity", 16)
    assert settle("llamagen", 8, interpolated, override=True) == ("llamagen", 8)
    assert settle(None, None, None) == ("identity", None)  # from scratch


def test_resolution_from_an_explicit_key_or_a_known_name(tmp_path):
    weights = {"model": build_gpt("GPT-nano").state_dict()}
    assert resolution_of(weights, "models/llamagen/t2i_XL_stage2_512.pt") == 512
    assert resolution_of(weights, "t2i_XL_stage1_256.pt") == 256
    assert resolution_of({**weights, "args": argparse.Namespace(image_size=384)}, "x.pt") == 384
    assert resolution_of(weights, "x.pt") is None
    ident = identity_of(weights, "t2i_XL_stage2_512.pt")
    assert (ident.text_rope, ident.origin, ident.rope_span) == ("llamagen", "llamagen", 32)
    with pytest.raises(ValueError, match="neither a Tessera checkpoint"):
        identity_of({"model": {"w": torch.zeros(1)}}, "x.pt")
    path = tmp_path / "t2i_XL_stage2_512.pt"
    torch.save(weights, path)
    model, resolution = load_generator(str(path), build_gpt("GPT-nano", text_rope="llamagen").cfg, None)
    assert resolution == 512 and model.grid == 32


def test_export_refuses_an_identity_mode_model_with_the_reason(tmp_path, data):
    result = train.run(_config(tmp_path), "stage1")
    with pytest.raises(ExportRefused, match="text_rope 'identity'.*another function"):
        export(result.checkpoint, str(tmp_path / "out.pt"))
    assert not (tmp_path / "out.pt").exists()


def test_export_with_optimizer_state_in_llamagen_layout(tmp_path, data):
    cfg = _config(tmp_path, text_rope="llamagen", max_steps=2, optim={"lr_per_256": 0.1})
    result = train.run(cfg, "stage1")
    out = export(result.checkpoint, str(tmp_path / "gpt.pt"), optimizer=True)
    saved = torch.load(out, weights_only=True)
    assert (saved["text_rope"], saved["rope_grid"], saved["resolution"], saved["steps"]) == ("llamagen", None, 256, 2)
    model = build_gpt("GPT-nano", vocab_size=64, text_rope="llamagen")
    model.load_state_dict(saved["model"], strict=True)
    # LlamaGen's trainer builds AdamW over its parameters in registration order, 2-dim ones
    # decayed first; the exported state loads into such an optimizer and lands on the right names.
    params = dict(model.named_parameters())
    ordered = [params[n] for n in llamagen_parameter_order(model.cfg.n_layer)]
    theirs = torch.optim.AdamW([{"params": [p for p in ordered if p.dim() >= 2], "weight_decay": 0.05},
                                {"params": [p for p in ordered if p.dim() < 2], "weight_decay": 0.0}])
    theirs.load_state_dict(saved["optimizer"])
    assert [g["weight_decay"] for g in theirs.state_dict()["param_groups"]] == [0.05, 0.0]
    full = _full_checkpoint(result.checkpoint, tmp_path)["optim"]["state"]
    for name, p in params.items():
        assert torch.equal(theirs.state[p]["exp_avg"], full[name]["exp_avg"]), name
        assert int(theirs.state[p]["step"]) == 2


def test_the_llamagen_parameter_order_is_that_of_the_released_state_dicts():
    shapes = json.loads(reference_file("llamagen_t2i_state_dicts.json").read_text())["GPT-B-t2i"]
    parameters = [n for n in shapes if not n.endswith("uncond_embedding")]  # a buffer there
    assert llamagen_parameter_order(12) == parameters


def _full_checkpoint(url: str, tmp_path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(url, tmp_path / "full.pt")
    return torch.load(tmp_path / "full.pt", weights_only=True)


def test_eval_finds_a_released_checkpoint_under_models_root_at_its_resolution(tmp_path):
    from tessera.pipelines import evaluate

    (tmp_path / "models" / "llamagen").mkdir(parents=True)
    path = tmp_path / "models" / "llamagen" / "t2i_XL_stage2_512.pt"
    torch.save({"model": build_gpt("GPT-nano", text_rope="llamagen").state_dict()}, path)
    cfg = RunConfig.model_validate({
        "name": "t", "data_root": str(tmp_path / "data"), "runs_root": str(tmp_path / "runs"),
        "models_root": str(tmp_path / "models"), "source": {"path": str(tmp_path / "src.parquet")},
        "eval": {"prompts": str(tmp_path / "prompts.parquet")}})
    [target] = evaluate.targets(cfg, "t", ["llamagen/t2i_XL_stage2_512.pt"])
    assert target.checkpoint == str(path) and target.label == "checkpoint-t2i_XL_stage2_512"
    assert evaluate._resolution(cfg.eval, target) == 512
