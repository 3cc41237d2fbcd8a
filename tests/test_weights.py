"""Published weight layouts map onto the model; strict loaders; synthetic files land tensor by tensor."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lwam.config import get_preset
from lwam.model.lightwam import LightWAM
from lwam.model.weights import (RELEASE_DIT_PREFIX, CheckpointMismatchError, dit_pretrained_keys,
                                load_lightwam_release, load_wan_dit, read_layout)


@pytest.fixture(scope="module")
def paper_meta():
    with torch.device("meta"):
        return LightWAM(get_preset("paper"))


def _shapes(module, keys=None):
    sd = module.state_dict()
    return {k: tuple(v.shape) for k, v in sd.items() if keys is None or k in keys}


def test_wan_dit_layout_maps_onto_paper_model(layouts, paper_meta):
    rows = read_layout(layouts / "wan2.1_t2v_1.3b_dit.tsv")
    file = {k: s for _, k, s in rows}
    model = _shapes(paper_meta.dit, set(dit_pretrained_keys(paper_meta.dit)))
    assert file == model


def test_release_layout_maps_onto_paper_model(layouts, paper_meta):
    rows = read_layout(layouts / "lightwam_release.tsv")
    by_entry: dict[str, dict] = {}
    for entry, k, s in rows:
        by_entry.setdefault(entry, {})[k] = s
    assert by_entry["mot"] == {RELEASE_DIT_PREFIX + k: s for k, s in _shapes(paper_meta.dit).items()}
    assert by_entry["state_fusion_action_expert"] == _shapes(paper_meta.expert)
    assert by_entry["proprio_encoder"] == _shapes(paper_meta.proprio_encoder)


def test_vae_layout_maps_onto_paper_model(layouts, paper_meta):
    rows = read_layout(layouts / "wan2.1_vae.tsv")
    assert {k: s for _, k, s in rows} == _shapes(paper_meta.vae)


def _distinct(sd):
    g = torch.Generator().manual_seed(3)
    return {k: torch.randn(v.shape, generator=g) for k, v in sd.items()}


def test_synthetic_wan_dit_file_loads_tensor_by_tensor(tmp_path):
    cfg = get_preset("tiny")
    model = LightWAM(cfg, build_vae=False)
    keys = dit_pretrained_keys(model.dit)
    state = _distinct({k: v for k, v in model.dit.state_dict().items() if k in keys})
    save_file(state, str(tmp_path / "dit.safetensors"))
    load_wan_dit(model.dit, tmp_path / "dit.safetensors")
    own = model.dit.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v), k


def test_synthetic_release_loads_and_names_bad_tensors(tmp_path):
    cfg = get_preset("tiny")
    model = LightWAM(cfg, build_vae=False)
    ckpt = {
        "mot": {RELEASE_DIT_PREFIX + k: v for k, v in _distinct(model.dit.state_dict()).items()},
        "state_fusion_action_expert": _distinct(model.expert.state_dict()),
        "proprio_encoder": _distinct(model.proprio_encoder.state_dict()),
        "step": 1234, "torch_dtype": "bfloat16",
    }
    ckpt["mot"] = {k: v.bfloat16() for k, v in ckpt["mot"].items()}
    torch.save(ckpt, tmp_path / "release.pt")
    meta = load_lightwam_release(model, tmp_path / "release.pt")
    assert meta == {"step": 1234, "torch_dtype": "bfloat16"}
    own = model.dit.state_dict()
    for k, v in ckpt["mot"].items():
        assert torch.equal(own[k[len(RELEASE_DIT_PREFIX):]], v.float()), k
    for k, v in ckpt["state_fusion_action_expert"].items():
        assert torch.equal(model.expert.state_dict()[k], v), k

    bad = dict(ckpt)
    bad["mot"] = dict(ckpt["mot"])
    del bad["mot"][RELEASE_DIT_PREFIX + "blocks.0.self_attn.lora_q.up_proj.weight"]
    bad["mot"][RELEASE_DIT_PREFIX + "blocks.0.bogus"] = torch.zeros(1)
    bad["proprio_encoder"] = {"weight": torch.zeros(3, 3), "bias": ckpt["proprio_encoder"]["bias"]}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointMismatchError) as e:
        load_lightwam_release(model, tmp_path / "bad.pt")
    msg = str(e.value)
    assert "blocks.0.self_attn.lora_q.up_proj.weight" in msg and "blocks.0.bogus" in msg
    del bad["mot"][RELEASE_DIT_PREFIX + "blocks.0.bogus"]
    bad["mot"][RELEASE_DIT_PREFIX + "blocks.0.self_attn.lora_q.up_proj.weight"] = ckpt["mot"][
        RELEASE_DIT_PREFIX + "blocks.0.self_attn.lora_q.up_proj.weight"]
    torch.save(bad, tmp_path / "bad2.pt")
    with pytest.raises(CheckpointMismatchError, match=r"weight: expected \(4096|weight: expected \(32, 4\)"):
        load_lightwam_release(model, tmp_path / "bad2.pt")


def test_release_loader_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"mot": Evil()}, tmp_path / "evil.pt")
    model = LightWAM(get_preset("tiny"), build_vae=False)
    with pytest.raises(ValueError) as e:
        load_lightwam_release(model, tmp_path / "evil.pt")
    msg = str(e.value)
    assert "evil.pt" in msg and "references print" in msg and "could run code" in msg
    assert "weights_only" not in msg  # torch's advice to load it with weights_only=False is not passed on
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_missing_file_named(tmp_path):
    model = LightWAM(get_preset("tiny"), build_vae=False)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_wan_dit(model.dit, tmp_path / "nope.safetensors")


def test_cli_info_paper_json():
    out = subprocess.run([sys.executable, "-m", "lwam.cli", "info", "--preset", "paper", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["parameters"]["trainable"] == 441_031_543
    assert info["parameters"]["frozen_dit"] == 1_418_895_360
    assert info["parameters"]["wan_dit"] == 1_418_996_800
    c = info["parameters"]["components"]
    assert c["lora"]["trainable"] == 87_490_560 and c["adapters"]["trainable"] == 2_373_888
    assert c["video_head"]["trainable"] == 101_440 and c["proprio_encoder"]["trainable"] == 36_864
    assert c["action_expert"]["trainable"] == 351_028_791 and c["vae"]["frozen"] == 126_892_531
    assert info["tokens"] == {"action_pass": 392, "video_pass": 294, "context": 129, "latent_frames": 3}


def test_cli_unknown_preset_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "lwam.cli", "info", "--preset", "huge"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "invalid choice: 'huge'" in out.stderr
