"""Checkpoint formats and the key/shape contract with the real Wan2.1 / OmniAvatar 1.3B checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from models.config import OMNIAVATAR_1_3B, TINY, WAN_1_3B, DiTConfig
from models.dit import WanDiT
from models.loading import (
    CheckpointError,
    inspect_checkpoint,
    load_dit,
    preset_shapes,
    save_dit,
    to_diffusers_key,
)
from models.lora import inject_lora, lora_state_dict

BASE = DiTConfig(name="base-small", dim=32, ffn_dim=64, num_heads=2, num_layers=4, text_dim=16, text_len=8)
OMNI = BASE.replace(name="omni-small", in_dim=33, audio_dim=24, audio_hidden=8)


def _json_shapes(path):
    return {k: tuple(v) for k, v in json.loads(path.read_text()).items()}


def test_wan_1_3b_keys_and_shapes_equal_the_real_checkpoint(oracles):
    assert preset_shapes(WAN_1_3B) == _json_shapes(oracles / "wan21_t2v_1.3b_keys.json")


def test_omniavatar_1_3b_keys_are_wan_plus_audio(oracles):
    wan = _json_shapes(oracles / "wan21_t2v_1.3b_keys.json")
    extra = json.loads((oracles / "omniavatar_1.3b_extra_keys.json").read_text())
    want = {**wan, **{k: tuple(v) for k, v in extra["added"].items()}}
    for k, change in extra["changed"].items():
        want[k] = tuple(change["omniavatar_1.3b"])
    got = preset_shapes(OMNIAVATAR_1_3B)
    assert got == want and len(got) == extra["num_keys_total"]
    assert sum(int(torch.tensor(s).prod()) for s in got.values()) == extra["num_params_total"]


def _write_wan_dir(tmp_path, model, sharded=False):
    d = tmp_path / "wan"
    d.mkdir()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    cfg = {"_class_name": "WanModel", "model_type": "t2v", "dim": model.cfg.dim, "ffn_dim": model.cfg.ffn_dim,
           "num_heads": model.cfg.num_heads, "num_layers": model.cfg.num_layers, "in_dim": 16, "out_dim": 16,
           "text_dim": model.cfg.text_dim, "text_len": model.cfg.text_len, "freq_dim": 256, "eps": 1e-6}
    (d / "config.json").write_text(json.dumps(cfg))
    if not sharded:
        save_file(sd, str(d / "diffusion_pytorch_model.safetensors"))
        return d
    keys = sorted(sd)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        name = f"diffusion_pytorch_model-0000{i}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(d / name))
        weight_map.update({k: name for k in part})
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d


def _same_output(a, b, cfg, **kw):
    """Same outputs on random inputs (the reference model must be randomized: a zero head proves nothing)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_dim, 2, 4, 4, generator=g)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    with torch.no_grad():
        want = b(x, torch.tensor([400.0]), ctx, **kw)
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(a(x, torch.tensor([400.0]), ctx, **kw), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sharded", [False, True])
def test_wan_original_dir(tmp_path, sharded, randomize):
    ref = randomize(WanDiT(BASE).eval())
    d = _write_wan_dir(tmp_path, ref, sharded)
    model, report = load_dit(d)
    assert report.config.dim == BASE.dim and report.left_at_init == []
    _same_output(model, ref, BASE)


def test_diffusers_dir_with_transformer_subfolder(tmp_path, randomize):
    ref = randomize(WanDiT(BASE).eval())
    d = tmp_path / "pipe" / "transformer"
    d.mkdir(parents=True)
    save_file({to_diffusers_key(k): v.contiguous() for k, v in ref.state_dict().items()},
              str(d / "diffusion_pytorch_model.safetensors"))
    (d / "config.json").write_text(json.dumps({
        "_class_name": "WanTransformer3DModel", "num_attention_heads": 2, "attention_head_dim": 16,
        "in_channels": 16, "out_channels": 16, "text_dim": 16, "ffn_dim": 64, "num_layers": 4}))
    model, _ = load_dit(tmp_path / "pipe", config=BASE)
    _same_output(model, ref, BASE)
    assert inspect_checkpoint(tmp_path / "pipe")["layout"] == "diffusers"


def test_omniavatar_pt_on_wan_base_with_lora(tmp_path, randomize):
    """pytorch_model.pt holds LoRA + audio + the 33-channel patch embedding; the rest comes from Wan."""
    torch.manual_seed(0)
    base = randomize(WanDiT(BASE).eval())
    wan_dir = _write_wan_dir(tmp_path, base)
    omni = WanDiT(OMNI).eval()
    omni.load_state_dict({k: v for k, v in base.state_dict().items() if k != "patch_embedding.weight"},
                         strict=False)
    inject_lora(omni, rank=4, alpha=2.0)
    with torch.no_grad():
        for k, p in omni.named_parameters():
            if "lora_B" in k:
                p.normal_(0, 0.05)
    ckpt = {k: v for k, v in omni.state_dict().items() if ".lora_" in k}
    ckpt = {**ckpt, **{k.replace(".base_layer.", "."): v for k, v in omni.state_dict().items()
                       if k.startswith(("audio_proj", "audio_cond_projs", "patch_embedding"))}}
    od = tmp_path / "omni"
    od.mkdir()
    torch.save(ckpt, od / "pytorch_model.pt")
    (od / "config.json").write_text(json.dumps({
        "train_architecture": "lora", "lora_rank": 4, "lora_alpha": 2.0, "use_audio": True,
        "model_config": {"in_dim": 33, "audio_hidden_size": 8}}))
    model, report = load_dit(od, config=OMNI, base=wan_dir)
    assert report.lora_rank == 4 and report.lora_merged
    audio = torch.randn(1, 2, 4, 24)
    _same_output(model, omni, OMNI, audio=audio)


def test_livetalk_style_prefixed_merged_file(tmp_path, randomize):
    ref = randomize(WanDiT(OMNI).eval())
    f = tmp_path / "model.safetensors"
    save_file({"model." + k: v.contiguous() for k, v in ref.state_dict().items()}, str(f))
    model, _ = load_dit(f, config=OMNI)
    _same_output(model, ref, OMNI, audio=torch.randn(1, 2, 4, 24))


def test_self_forcing_style_generator_dict(tmp_path, randomize):
    ref = randomize(WanDiT(BASE).eval())
    torch.save({"generator_ema": {"model." + k: v for k, v in ref.state_dict().items()}}, tmp_path / "sf.pt")
    model, _ = load_dit(tmp_path / "sf.pt", config=BASE)
    _same_output(model, ref, BASE)


def test_own_format_round_trip_reports_extensions(tmp_path, randomize):
    ref = randomize(WanDiT(TINY).eval())
    inject_lora(ref, rank=2, alpha=2.0)
    save_dit(ref, tmp_path / "ck")
    assert (tmp_path / "ck" / "lora.safetensors").exists()
    model, report = load_dit(tmp_path / "ck")
    assert report.config == TINY and report.lora_rank == 2 and report.left_at_init == []
    assert set(lora_state_dict(ref)) and not any(".lora_" in k for k in model.state_dict())


def test_wan_checkpoint_into_avatar_preset_reports_modules_left_at_init(tmp_path, randomize):
    cfg = BASE.replace(name="ext", null_context_len=2, ref_injection=True, aem_layers=(1,))
    ref = randomize(WanDiT(BASE).eval())
    d = _write_wan_dir(tmp_path, ref)
    model, report = load_dit(d, config=cfg)
    assert report.left_at_init == ["emotion_module", "null_context", "reference_injection"]


def test_errors_name_the_file_key_and_shapes(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a checkpoint"):
        load_dit(tmp_path / "nope", config=BASE)
    ref = WanDiT(BASE)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    sd["blocks.0.ffn.0.weight"] = torch.zeros(3, 3)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*blocks\.0\.ffn\.0\.weight.*\(3, 3\).*\(64, 32\)"):
        load_dit(tmp_path / "bad.safetensors", config=BASE)
    sd.pop("blocks.0.ffn.0.weight")
    save_file(sd, str(tmp_path / "short.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 core tensors.*blocks.0.ffn.0.weight"):
        load_dit(tmp_path / "short.safetensors", config=BASE)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="junk.safetensors: cannot read"):
        load_dit(tmp_path / "junk.safetensors", config=BASE)
    with pytest.raises(CheckpointError, match="no config"):
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "nocfg.safetensors"))
        load_dit(tmp_path / "nocfg.safetensors")


def test_inspect_matches_presets(tmp_path):
    save_dit(WanDiT(TINY), tmp_path / "tiny")
    info = inspect_checkpoint(tmp_path / "tiny")
    assert [m["preset"] for m in info["matches"] if m["exact"]] == ["tiny"]
    assert info["audio_path"] and info["in_dim"] == 33
    other = WanDiT(BASE)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "o.safetensors"))
    info = inspect_checkpoint(tmp_path / "o.safetensors")
    assert info["matches"] == [] and info["closest"]["preset"]
