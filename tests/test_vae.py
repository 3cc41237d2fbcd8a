"""Wan2.1 VAE: published key layout, loading, causal chunked processing, input checks, tiny training."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lwam.config import VAEConfig, get_preset
from lwam.model.vae import WanVAE, count_parameters, load_wan_vae_state_dict
from lwam.vae_train import estimate_latent_stats, load_vae_checkpoint, train_vae

LAYOUT = Path(__file__).resolve().parent / "data" / "checkpoint_layouts" / "wan2.1_vae.tsv"
PAPER_PARAMS = 126_892_531


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small convolutions: one thread avoids OpenMP oversubscription on a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg() -> VAEConfig:
    return get_preset("tiny").vae


def randomized_tiny(seed: int = 0) -> WanVAE:
    """Tiny VAE with every parameter perturbed (the zero-initialised convs too), in eval mode."""
    torch.manual_seed(seed)
    vae = WanVAE(tiny_cfg()).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


def video(b: int, t: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


def read_layout(path: Path) -> dict[str, tuple[int, ...]]:
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert rows[0] == ["key", "shape"]
    return {k: tuple(int(d) for d in s.split("x")) for k, s in rows[1:]}


# ------------------------------------------------------------------------------------------- layout
def test_paper_layout_matches_published_file():
    expected = read_layout(LAYOUT)
    with torch.device("meta"):
        vae = WanVAE(VAEConfig())
    got = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert list(got) == list(expected)  # same names, same order
    assert got == expected
    assert count_parameters(vae) == PAPER_PARAMS
    assert sum(p.numel() for p in vae.parameters()) == PAPER_PARAMS
    assert "latent_mean" not in got and "latent_std" not in got


def test_paper_meta_model_loads_file_in_its_layout(tmp_path):
    """A file in the paper layout loads onto a meta-device model (assign), on the CPU, strict."""
    with torch.device("meta"):
        vae = WanVAE(VAEConfig())
    state = {k: torch.zeros(v.shape) for k, v in vae.state_dict().items()
             if k.startswith(("conv1", "conv2", "decoder.head"))}  # a subset keeps the file small
    path = tmp_path / "subset.pth"
    torch.save(state, path)
    vae.load_pretrained(path, strict=False)
    assert vae.conv1.weight.device.type == "cpu" and vae.encoder.conv1.weight.is_meta
    assert torch.equal(vae.latent_std, torch.tensor(VAEConfig().latent_std))


# ------------------------------------------------------------------------------------------ loading
def synthetic_state(vae: WanVAE, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in vae.state_dict().items()}


@pytest.mark.parametrize("nested", [False, True])
def test_pth_loads_tensor_by_tensor(tmp_path, nested):
    vae = WanVAE(tiny_cfg())
    state = synthetic_state(vae)
    path = tmp_path / "vae.pth"
    torch.save({"model_state": state} if nested else state, path)
    assert load_wan_vae_state_dict(path).keys() == state.keys()
    assert vae.load_pretrained(path) is vae
    loaded = vae.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    built = WanVAE.load_pretrained(path, cfg=tiny_cfg())  # class-level call builds the model first
    assert all(torch.equal(built.state_dict()[k], v) for k, v in state.items())


def test_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x": torch.zeros(1), "obj": Path("/")}, path)
    with pytest.raises(ValueError, match="evil.pth.*could run code") as e:  # plain tensors only, no objects
        load_wan_vae_state_dict(path)
    assert "weights_only" not in str(e.value)


def test_load_errors_name_the_tensor(tmp_path):
    vae = WanVAE(tiny_cfg())
    good = synthetic_state(vae)

    def write(state, name):
        p = tmp_path / name
        torch.save(state, p)
        return p

    missing = dict(good)
    del missing["decoder.head.2.bias"]
    with pytest.raises(ValueError, match=r"missing.*decoder\.head\.2\.bias"):
        vae.load_pretrained(write(missing, "missing.pth"))

    extra = dict(good, **{"encoder.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected.*encoder\.extra\.weight"):
        vae.load_pretrained(write(extra, "extra.pth"))

    bad = dict(good, **{"conv2.weight": torch.zeros(16, 16, 1, 1)})
    with pytest.raises(ValueError, match=r"conv2\.weight.*\(16, 16, 1, 1, 1\).*\(16, 16, 1, 1\)"):
        vae.load_pretrained(write(bad, "bad.pth"))
    with pytest.raises(ValueError, match=r"conv2\.weight"):  # a shape mismatch is never tolerated
        vae.load_pretrained(write(bad, "bad2.pth"), strict=False)

    before = vae.state_dict()["conv1.weight"].clone()
    vae.load_pretrained(write(missing, "missing2.pth"), strict=False)
    assert not torch.equal(vae.state_dict()["conv1.weight"], before)

    with pytest.raises(FileNotFoundError):
        load_wan_vae_state_dict(tmp_path / "nope.pth")


# ---------------------------------------------------------------------------------- shapes, causality
@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("t,lt", [(1, 1), (5, 2), (9, 3)])
def test_frame_counts(t, lt, chunked):
    vae = randomized_tiny()
    with torch.no_grad():
        z = vae.encode(video(2, t, 32, 48), chunked=chunked)
        assert z.shape == (2, 16, lt, 4, 6)
        y = vae.decode(z, chunked=chunked)
    assert y.shape == (2, 3, t, 32, 48)
    assert y.min() >= -1 and y.max() <= 1


def test_chunked_equals_whole_sequence():
    vae = randomized_tiny(1)
    x = video(1, 9, seed=1)
    with torch.no_grad():
        z_c, z_f = vae.encode(x, chunked=True), vae.encode(x, chunked=False)
        torch.testing.assert_close(z_c, z_f, rtol=1e-4, atol=1e-5)
        y_c, y_f = vae.decode(z_c, chunked=True), vae.decode(z_c, chunked=False)
        torch.testing.assert_close(y_c, y_f, rtol=1e-4, atol=1e-5)
        # the chunked encoder really consumes [1], [4], [4] frames: a 5-frame prefix gives the same latents
        torch.testing.assert_close(vae.encode(x[:, :, :5]), z_c[:, :, :2], rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 4, 5, 8])
def test_encoder_is_causal(k):
    vae = randomized_tiny(2)
    x = video(1, 9, seed=2)
    x2 = x.clone()
    x2[:, :, k] = -x2[:, :, k]
    with torch.no_grad():
        z, z2 = vae.encode(x), vae.encode(x2)
    first_affected = (k + 3) // 4  # latent j sees frames 0 .. 4j
    assert torch.equal(z[:, :, :first_affected], z2[:, :, :first_affected])
    assert not torch.equal(z[:, :, first_affected], z2[:, :, first_affected])


def test_decoder_is_causal():
    vae = randomized_tiny(3)
    z = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    z2 = z.clone()
    z2[:, :, 2] += 1.0
    with torch.no_grad():
        y, y2 = vae.decode(z), vae.decode(z2)
    assert torch.equal(y[:, :, :5], y2[:, :, :5])  # latent 2 only reaches frames 5..8
    assert not torch.equal(y[:, :, 5:], y2[:, :, 5:])


def test_latent_normalisation_and_stats():
    vae = randomized_tiny(4)
    x = video(2, 5, seed=4)
    mean, std = torch.linspace(-1, 1, 16), torch.linspace(0.5, 2, 16)
    vae.set_latent_stats(mean, std)
    assert vae.cfg.latent_mean == pytest.approx(mean.tolist()) and "latent_mean" not in vae.state_dict()
    with torch.no_grad():
        mu, _ = vae.encode_moments(x)
        z = vae.encode(x)
        torch.testing.assert_close(z, (mu - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1))
        torch.testing.assert_close(vae.decode(z), vae._decode_raw(mu, chunked=True).clamp(-1, 1),
                                   rtol=1e-4, atol=1e-5)
        m, s = estimate_latent_stats(vae, x)
    assert m.shape == s.shape == (16,)
    torch.testing.assert_close(m, mu.mean(dim=(0, 2, 3, 4)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="std"):
        vae.set_latent_stats(mean, -std)


@pytest.mark.parametrize("shape,match", [
    ((1, 3, 32, 32), "rank 5"),
    ((1, 4, 5, 32, 32), "3 channels"),
    ((1, 3, 4, 32, 32), "T = 1 \\+ 4\\*k"),
    ((1, 3, 5, 30, 32), "multiples of 8"),
])
def test_bad_video_raises(shape, match):
    vae = WanVAE(tiny_cfg())
    with pytest.raises(ValueError, match=rf"video: expected .*{match}.*{shape[-1]}"):
        vae.encode(torch.zeros(shape))


def test_bad_latent_and_dtype_raise():
    vae = WanVAE(tiny_cfg())
    with pytest.raises(ValueError, match=r"z: expected shape \[B, 16, T, h, w\].*\(1, 8, 2, 4, 4\)"):
        vae.decode(torch.zeros(1, 8, 2, 4, 4))
    with pytest.raises(TypeError, match="video: expected a floating-point"):
        vae.encode(torch.zeros(1, 3, 1, 32, 32, dtype=torch.uint8))


# --------------------------------------------------------------------------------------- training
def test_train_vae_reduces_loss_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    vae = WanVAE(tiny_cfg())
    g = torch.Generator().manual_seed(0)
    frames = (torch.rand(4, 3, 1, 1, 1, generator=g).expand(4, 3, 5, 32, 32)
              + 0.2 * torch.rand(4, 3, 5, 32, 32, generator=g)) * 1.6 - 1  # flat colours + texture
    logged: list[dict] = []
    metrics = train_vae(vae, frames, steps=12, lr=3e-3, batch_size=2, out_dir=tmp_path, progress=False,
                        log=logged.append, log_every=1)
    losses = [d["loss"] for d in logged if not d.get("final")]
    assert len(losses) == 12 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert metrics["steps"] == 12 and metrics["psnr"] > 0 and metrics["recon_l1"] < losses[0]
    # latent statistics re-estimated on the training clips: normalised latents are ~unit scale
    with torch.no_grad():
        z = vae.encode(frames)
    assert abs(float(z.mean())) < 0.1 and 0.8 < float(z.transpose(0, 1).flatten(1).std(1).mean()) < 1.2
    # the checkpoint reloads to the same model, statistics included
    reloaded = load_vae_checkpoint(metrics["checkpoint"])
    assert reloaded.cfg == vae.cfg
    for k, v in vae.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    assert torch.equal(reloaded.latent_std, vae.latent_std)
    assert not list(tmp_path.glob(".*tmp*"))


def test_train_vae_accepts_a_dataset_and_checks_input():
    vae = WanVAE(tiny_cfg())
    clips = [torch.zeros(3, 5, 16, 16) for _ in range(3)]
    m = train_vae(vae, clips, steps=1, lr=1e-3, batch_size=2, progress=False, clip_frames=1)
    assert m["steps"] == 1 and len(m["latent_std"]) == 16
    with pytest.raises(ValueError, match="frames: expected"):
        train_vae(vae, torch.zeros(2, 3, 4, 16, 16), steps=1, lr=1e-3, batch_size=1, progress=False)
