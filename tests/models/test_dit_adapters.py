"""Avatar extensions: exact no-ops at initialisation, active once trained, FAA masks respected."""

from __future__ import annotations

import pytest
import torch

from models.config import TINY
from models.dit import FaceAudioAdapter, WanDiT

BASE = TINY.replace(name="tiny-base", faa_layers=(), aem_layers=(), ref_injection=False, null_context_len=0,
                    motion_condition=False)


def _inputs(seed=0, frames=3, chars=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(1, 16, frames, 4, 4, generator=g),
        t=torch.tensor([500.0]),
        context=torch.randn(1, TINY.text_len, TINY.text_dim, generator=g),
        y=torch.randn(1, 17, frames, 4, 4, generator=g),
        audio=torch.randn(1, frames, 4, TINY.audio_dim, generator=g),
    )


def _extras(seed=1, chars=1, frames=3):
    g = torch.Generator().manual_seed(seed)
    return dict(
        reference=torch.randn(1, 16, 4, 4, generator=g),
        emotion=torch.randn(1, 16, 1, 4, 4, generator=g),
        face_mask=torch.ones(1, chars, 2, 2),
        face_audio=torch.randn(1, chars, frames, 4, TINY.audio_dim, generator=g),
        motion=torch.tensor([0.7]),
    )


def _run(model, inp, **kw):
    x, t, ctx = inp["x"], inp["t"], inp["context"]
    with torch.no_grad():
        return model(x, t, ctx, y=inp["y"], audio=inp["audio"], **kw)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    full = WanDiT(TINY).eval()
    with torch.no_grad():  # a "trained" base (fresh Wan init has a zero head); extensions stay at init
        for name, p in full.named_parameters():
            if not name.startswith(sum(WanDiT.EXTENSIONS.values(), ())) or name.startswith("audio"):
                p.add_(0.05 * torch.randn_like(p))
    base = WanDiT(BASE).eval()
    base.load_state_dict({k: v for k, v in full.state_dict().items() if k in base.state_dict()}, strict=True)
    return full, base


def test_every_extension_is_a_bit_exact_no_op_at_init(pair):
    full, base = pair
    inp = _inputs()
    assert torch.equal(_run(full, inp, **_extras()), _run(base, inp))


@pytest.mark.parametrize("module,extra_key", [
    ("face_adapters", "face_mask"), ("emotion_adapters", "emotion"), ("ref_proj", "reference"),
    ("motion_embedding", "motion")])
def test_each_extension_is_active_once_perturbed(pair, module, extra_key):
    full, base = pair
    model = WanDiT(TINY).eval()
    model.load_state_dict(full.state_dict())
    with torch.no_grad():
        for p in getattr(model, module).parameters():
            p.add_(0.1 * torch.randn_like(p))
    inp, ex = _inputs(), _extras()
    with_all = _run(model, inp, **ex)
    assert not torch.equal(with_all, _run(base, inp))
    without = {k: v for k, v in ex.items() if k != extra_key}
    # removing this module's input brings the output back to the base model's (others are still no-ops)
    assert torch.equal(_run(model, inp, **without), _run(base, inp))
    if extra_key in ("emotion", "reference", "motion"):  # and its input matters
        other = dict(ex, **{extra_key: ex[extra_key] + 1.0})
        assert not torch.allclose(_run(model, inp, **other), with_all)


def _trained_faa(seed=0):
    torch.manual_seed(seed)
    faa = FaceAudioAdapter(TINY).eval()
    with torch.no_grad():
        for p in faa.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return faa


@torch.no_grad()
def test_faa_leaves_tokens_outside_every_mask_exactly_unchanged():
    faa = _trained_faa()
    b, f, t, d = 1, 3, 16, TINY.dim
    x = torch.randn(b, f * t, d)
    tokens = torch.randn(b, 2, f, 4, d)
    masks = torch.zeros(b, 2, 1, t)
    masks[0, 0, 0, :5] = 1
    masks[0, 1, 0, 9:12] = 1
    out = faa(x, tokens, masks)
    inside = (masks.sum(1) > 0).expand(b, f, t).reshape(b, f * t)
    assert torch.equal(out[~inside], x[~inside])
    assert (out[inside] - x[inside]).abs().min() > 0


@torch.no_grad()
def test_faa_two_characters_only_change_their_own_regions():
    faa = _trained_faa(1)
    b, f, t, d = 1, 2, 16, TINY.dim
    x = torch.randn(b, f * t, d)
    tokens = torch.randn(b, 2, f, 4, d)
    masks = torch.zeros(b, 2, f, t)
    masks[:, 0, :, :8] = 1  # left face
    masks[:, 1, :, 8:] = 1  # right face
    out = faa(x, tokens, masks)
    changed = tokens.clone()
    changed[:, 1] += 1.0  # the second speaker says something else
    out2 = faa(x, changed, masks)
    region0 = masks[:, 0].reshape(b, f * t) > 0
    assert torch.equal(out2[region0], out[region0])
    assert not torch.allclose(out2[~region0], out[~region0])
    # per frame: frame 0's tokens only see frame 0's audio
    later = tokens.clone()
    later[:, :, 1] += 1.0
    out3 = faa(x, later, masks)
    assert torch.equal(out3[:, :t], out[:, :t]) and not torch.allclose(out3[:, t:], out[:, t:])


@torch.no_grad()
def test_faa_in_the_model_uses_per_character_audio(pair):
    full, _ = pair
    model = WanDiT(TINY).eval()
    model.load_state_dict(full.state_dict())
    for a in model.face_adapters.values():
        torch.nn.init.normal_(a.attn.to_out.weight, std=0.1)
    inp, ex = _inputs(), _extras(chars=2)
    ex["face_mask"] = torch.stack([torch.tensor([[1.0, 0], [1, 0]]), torch.tensor([[0.0, 1], [0, 1]])])[None]
    a = _run(model, inp, **ex)
    ex2 = dict(ex, face_audio=ex["face_audio"].clone())
    ex2["face_audio"][:, 1] = 0.0
    assert not torch.allclose(a, _run(model, inp, **ex2))


def test_null_context_is_used_without_text(pair):
    full, _ = pair
    inp = _inputs()
    with torch.no_grad():
        a = full(inp["x"], inp["t"], None, y=inp["y"], audio=inp["audio"])
        b = full(inp["x"], inp["t"], full.null_context.detach().clone(), y=inp["y"], audio=inp["audio"])
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="no learned null context"):
        WanDiT(BASE)(inp["x"], inp["t"], None, y=inp["y"])


def test_input_errors_are_clear(pair):
    full, _ = pair
    inp = _inputs()
    with pytest.raises(ValueError, match=r"latents \(with y\) must be \(B, 33"):
        full(inp["x"], inp["t"], inp["context"])
    with pytest.raises(ValueError, match="audio must be"):
        full(inp["x"], inp["t"], inp["context"], y=inp["y"], audio=inp["audio"][:, :2])
    with pytest.raises(ValueError, match="divisible by the patch"):
        full(torch.randn(1, 16, 3, 5, 4), inp["t"], inp["context"], y=torch.randn(1, 17, 3, 5, 4))
    with pytest.raises(ValueError, match="context must be"):
        full(inp["x"], inp["t"], torch.randn(1, 99, TINY.text_dim), y=inp["y"])
    with pytest.raises(ValueError, match="face_mask must be"):
        full(inp["x"], inp["t"], inp["context"], y=inp["y"], audio=inp["audio"], face_mask=torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match=r"t must be \(B,\) or \(B, F\)"):
        full(inp["x"], torch.tensor([[1.0, 2.0]]), inp["context"], y=inp["y"])


def test_the_emotion_module_reads_the_emotion_image_by_place():
    """With the spatial RoPE a token attends the emotion image's tokens by where they sit: moving the emotion
    image's patches around changes the output (cross-attention without positions is exactly invariant to it)."""
    from models.dit import EmotionAdapter
    from models.rope import rope_table

    torch.manual_seed(0)
    aem = EmotionAdapter(TINY).eval()
    with torch.no_grad():
        aem.gate.fill_(1.0)
    g = torch.Generator().manual_seed(3)
    h = w = 4
    x = torch.randn(1, 2 * h * w, TINY.dim, generator=g)  # two frames of a 4x4 token grid
    emo = torch.randn(1, h * w, TINY.dim, generator=g)
    moved = emo[:, torch.randperm(h * w, generator=g)]
    rope = rope_table(TINY.rope_split, (1, h, w), 0, torch.device("cpu"))
    with torch.no_grad():
        assert torch.allclose(aem(x, emo), aem(x, moved), atol=1e-5)  # no positions: a set of tokens
        assert not torch.allclose(aem(x, emo, rope), aem(x, moved, rope), atol=1e-3)
        # the two frames sit at the same place of the emotion image: equal tokens, equal outputs
        same = torch.cat([x[:, :h * w], x[:, :h * w]], dim=1)
        out = aem(same, emo, rope)
        assert torch.allclose(out[:, :h * w], out[:, h * w:], atol=1e-5)
