"""lwam.data: LeRobot round trip, windows at episode boundaries, camera layouts, normalisation,
corrupt / missing videos, resumable latent cache, text cache."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from lwam.config import get_preset
from lwam.data.cache import CachedWindowDataset, build_latent_cache
from lwam.data.cameras import compose_cameras, compose_observation, compose_uint8
from lwam.data.lerobot import LeRobotReader, LeRobotWriter, VideoDecodeError
from lwam.data.normalize import Normalizer, compute_stats, dataset_stats
from lwam.data.windows import WindowDataset, collate_windows

pytest.importorskip("av")
pytest.importorskip("pyarrow")

S = 32  # camera side in the synthetic dataset


def _frames(t: int, seed: int) -> np.ndarray:
    """Smooth moving gradients (lossy codecs keep them well): uint8 [t, S, S, 3]."""
    yy, xx = np.mgrid[:S, :S].astype(np.float64)
    out = []
    for k in range(t):
        r = 0.5 + 0.5 * np.sin(xx / 6.0 + k / 4.0 + seed)
        g = 0.5 + 0.5 * np.cos(yy / 5.0 - k / 5.0)
        b = np.full_like(r, (seed * 37 % 255) / 255.0)
        out.append(np.stack([r, g, b], -1))
    return (np.stack(out) * 255).round().astype(np.uint8)


def _data_cfg(**kw):
    base = get_preset("tiny").data
    return dataclasses.replace(base, image_height=S, image_width=2 * S, **kw)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """Three episodes: lengths 40, 10 (shorter than a window), 33 (exactly one window)."""
    root = tmp_path_factory.mktemp("ds") / "demo"
    rng = np.random.default_rng(0)
    w = LeRobotWriter(root, fps=20, state_dim=4, action_dim=4, video_keys=["corner", "gripper"],
                      image_size=(S, S))
    episodes = []
    for i, (t, task) in enumerate([(40, "press the button"), (10, "open the drawer"), (33, "press the button")]):
        st = rng.normal(size=(t, 4)).astype(np.float32)
        ac = rng.uniform(-1, 1, size=(t, 4)).astype(np.float32)
        ims = {"corner": _frames(t, i), "gripper": _frames(t, i + 10)}
        w.add_episode(st, ac, ims, task, extra={"seed": i})
        episodes.append((st, ac, ims, task))
    return root, episodes


def test_lerobot_round_trip(dataset_dir):
    root, episodes = dataset_dir
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v2.1"
    assert info["total_episodes"] == 3 and info["total_frames"] == 83 and info["fps"] == 20
    assert (root / "data/chunk-000/episode_000001.parquet").is_file()
    assert (root / "videos/chunk-000/observation.images.gripper/episode_000002.mp4").is_file()
    for name in ("episodes.jsonl", "tasks.jsonl", "episodes_stats.jsonl"):
        assert (root / "meta" / name).is_file()
    ds = LeRobotReader(root)
    assert ds.num_episodes == 3 and ds.cameras == ["corner", "gripper"]
    assert ds.tasks == ["press the button", "open the drawer"]
    idx_seen = []
    for ep, (st, ac, ims, task) in enumerate(episodes):
        d = ds.episode_data(ep)
        np.testing.assert_array_equal(d["observation.state"], st)
        np.testing.assert_array_equal(d["action"], ac)
        np.testing.assert_array_equal(d["frame_index"], np.arange(len(st)))
        assert ds.instruction(ep) == task and d["task_index"][0] == ds.tasks.index(task)
        idx_seen.append(d["index"])
        for cam in ("corner", "gripper"):
            v = ds.episode_video(ep, cam)
            assert v.shape == ims[cam].shape and v.dtype == np.uint8
            err = np.abs(v.astype(np.float64) - ims[cam])
            assert err.mean() < 8.0, (cam, err.mean())  # yuv420p halves chroma resolution
    np.testing.assert_array_equal(np.concatenate(idx_seen), np.arange(83))


def test_writer_appends_after_restart(tmp_path):
    root = tmp_path / "ds"
    args = dict(fps=10, state_dim=2, action_dim=3, video_keys=["cam"], image_size=(16, 16))
    w = LeRobotWriter(root, **args)
    w.add_episode(np.zeros((5, 2)), np.zeros((5, 3)), {"cam": np.zeros((5, 16, 16, 3), np.uint8)}, "a")
    w2 = LeRobotWriter(root, **args)  # a new process continuing the same dataset
    assert w2.num_episodes == 1
    w2.add_episode(np.ones((4, 2)), np.ones((4, 3)), {"cam": np.zeros((4, 16, 16, 3), np.uint8)}, "b")
    ds = LeRobotReader(root)
    assert ds.num_episodes == 2 and ds.tasks == ["a", "b"]
    np.testing.assert_array_equal(ds.episode_data(1)["index"], np.arange(5, 9))
    with pytest.raises(ValueError, match="actions"):
        w2.add_episode(np.ones((4, 2)), np.ones((3, 3)), {"cam": np.zeros((4, 16, 16, 3), np.uint8)}, "b")


def test_windows_boundaries(dataset_dir):
    root, episodes = dataset_dir
    cfg = _data_cfg()
    win = WindowDataset(root, cfg, frame_cache="memory")
    assert len(win) == 83
    norm = win.normalizer

    def check(index, ep, t):
        st, ac, ims, task = episodes[ep]
        n = len(st)
        s = win[index]
        assert s["episode_index"] == ep and s["frame_index"] == t and s["instruction"] == task
        assert s["video"].shape == (3, 9, S, 2 * S) and s["video"].dtype == torch.float32
        assert s["actions"].shape == (32, 4) and s["proprio"].shape == (4,)
        a_idx = t + np.arange(32)
        f_idx = t + 4 * np.arange(9)
        np.testing.assert_array_equal(s["actions_is_pad"].numpy(), a_idx > n - 1)
        np.testing.assert_array_equal(s["frames_is_pad"].numpy(), f_idx > n - 1)
        np.testing.assert_allclose(norm.invert("action", s["actions"]).numpy(), ac[np.minimum(a_idx, n - 1)],
                                   atol=1e-5)
        np.testing.assert_allclose(norm.invert("observation.state", s["proprio"]).numpy(), st[t], atol=1e-5)
        # clamped frames repeat the last frame exactly
        last = np.minimum(f_idx, n - 1)
        for j in range(9):
            if last[j] == n - 1:
                torch.testing.assert_close(s["video"][:, j], s["video"][:, int(np.argmax(last == n - 1))])
        assert s["video"].min() >= -1.0 and s["video"].max() <= 1.0
        return s

    s = check(0, 0, 0)
    assert not s["actions_is_pad"].any() and not s["frames_is_pad"].any()
    s = check(39, 0, 39)  # window starting at the last frame of episode 0
    assert s["actions_is_pad"].sum() == 31 and s["frames_is_pad"].sum() == 8
    s = check(40, 1, 0)  # episode shorter than a window
    assert s["actions_is_pad"].sum() == 22 and s["frames_is_pad"].tolist() == [False] * 3 + [True] * 6
    s = check(82, 2, 32)
    s = check(50, 2, 0)  # 33-step episode: frame 32 is the last real frame, action 31 is real
    assert not s["actions_is_pad"].any() and not s["frames_is_pad"].any()

    # pixels: the composed frame is the two cameras side by side, through the lossy codec
    ims = episodes[0][2]
    v = (win[0]["video"][:, 0].permute(1, 2, 0).numpy() + 1) * 127.5
    ref = np.concatenate([ims["corner"][0], ims["gripper"][0]], axis=1).astype(np.float64)
    assert np.abs(v - ref).mean() < 8.0

    b = collate_windows([win[0], win[45]])
    assert b["video"].shape == (2, 3, 9, S, 2 * S) and b["episode_index"].tolist() == [0, 1]
    assert b["instruction"] == ["press the button", "open the drawer"]


def test_disk_frame_cache_matches_memory(dataset_dir, tmp_path):
    root, _ = dataset_dir
    cfg = _data_cfg()
    mem = WindowDataset(root, cfg, frame_cache="memory")
    disk = WindowDataset(root, cfg, cache_dir=tmp_path / "frames").prepare(progress=False)
    assert len(list((tmp_path / "frames").glob("episode_*.npy"))) == 3
    for i in (0, 39, 45, 82):
        torch.testing.assert_close(mem[i]["video"], disk[i]["video"], rtol=0, atol=0)
    again = WindowDataset(root, cfg, cache_dir=tmp_path / "frames")  # reuses the files
    assert isinstance(again.episode_frames(0), np.memmap)


def test_camera_layouts():
    a = torch.arange(3 * 4 * 4, dtype=torch.float32).reshape(1, 3, 4, 4)
    b = -a
    out = compose_cameras([a, b], "libero", 4, 8, rotate_180=True)
    assert out.shape == (1, 3, 4, 8)
    torch.testing.assert_close(out[..., :4], a.flip(-2, -1))
    torch.testing.assert_close(out[..., 4:], b.flip(-2, -1))
    out = compose_cameras([a[0], b[0]], "libero", 4, 8)  # unbatched
    assert out.shape == (3, 4, 8)
    torch.testing.assert_close(out[..., :4], a[0])

    head = torch.ones(2, 3, 24, 30)
    lw, rw = torch.full((2, 3, 8, 10), 2.0), torch.full((2, 3, 8, 10), 3.0)
    out = compose_cameras([head, lw, rw], "robotwin", 12, 10)  # head 8x10, wrists 4x5
    assert out.shape == (2, 3, 12, 10)
    torch.testing.assert_close(out[:, :, :8], torch.ones(2, 3, 8, 10))  # resized: exact up to rounding
    torch.testing.assert_close(out[:, :, 8:, :5], torch.full((2, 3, 4, 5), 2.0))
    torch.testing.assert_close(out[:, :, 8:, 5:], torch.full((2, 3, 4, 5), 3.0))
    out = compose_cameras([head, lw, rw], "robotwin", 384, 320)
    assert out.shape == (2, 3, 384, 320)

    cams = [torch.full((1, 3, 6, 6), float(i)) for i in range(3)]
    out = compose_cameras(cams, "row", 6, 12)  # each resized to 6x4
    assert out.shape == (1, 3, 6, 12)
    for i in range(3):
        assert torch.allclose(out[..., 4 * i:4 * i + 4], torch.tensor(float(i)))
    with pytest.raises(ValueError, match="libero"):
        compose_cameras(cams, "libero", 6, 12)
    with pytest.raises(ValueError, match="camera_layout"):
        compose_cameras(cams, "grid", 6, 12)

    u = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(compose_uint8([u, u], "row", 8, 16), np.concatenate([u, u], axis=2))
    cfg = _data_cfg()
    obs = compose_observation({"corner": u[0], "gripper": u[1], "other": u[0]},
                              dataclasses.replace(cfg, image_height=8, image_width=16))
    assert obs.shape == (3, 8, 16) and obs.min() >= -1 and obs.max() <= 1


@pytest.mark.parametrize("mode", ["minmax", "zscore"])
def test_normalizer_round_trip(mode):
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, size=(500, 5)).astype(np.float32)
    x[:, 3] = 7.0  # constant dimension
    stats = {"action": compute_stats(x)}
    n = Normalizer(stats, {"action": mode}, clip=5.0)
    y = n.apply("action", x)
    assert np.isfinite(y).all() and (y[:, 3] == 0).all()
    if mode == "minmax":
        np.testing.assert_allclose(y[:, [0, 1, 2, 4]].min(0), -1, atol=1e-6)
        np.testing.assert_allclose(y[:, [0, 1, 2, 4]].max(0), 1, atol=1e-6)
    np.testing.assert_allclose(n.invert("action", y), x, rtol=1e-6, atol=1e-5)
    yt = n.apply("action", torch.from_numpy(x))
    assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float32
    torch.testing.assert_close(n.invert("action", yt), torch.from_numpy(x), rtol=1e-6, atol=1e-5)
    far = np.full((1, 5), 1e6, np.float32)  # clamped
    assert np.abs(n.apply("action", far)).max() == 5.0
    n2 = Normalizer.from_dict(json.loads(json.dumps(n.to_dict())))
    np.testing.assert_array_equal(n2.apply("action", x), y)
    assert compute_stats([x[:123], x[123:]])["std"] == pytest.approx(stats["action"]["std"], rel=1e-12)


def test_dataset_stats_stored(dataset_dir):
    root, episodes = dataset_dir
    stats = dataset_stats(LeRobotReader(root))
    assert (root / "meta" / "lwam_stats.json").is_file()
    all_ac = np.concatenate([e[1] for e in episodes])
    np.testing.assert_allclose(stats["action"]["min"], all_ac.min(0), rtol=1e-6)
    assert stats["action"]["count"] == 83


def _copy_dataset(root, dst):
    import shutil

    shutil.copytree(root, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_bad_video_names_the_file(dataset_dir, tmp_path, damage):
    root = _copy_dataset(dataset_dir[0], tmp_path / "ds")
    bad = root / "videos/chunk-000/observation.images.gripper/episode_000001.mp4"
    if damage == "missing":
        bad.unlink()
    elif damage == "truncated":
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 3])
    else:
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    ds = LeRobotReader(root)
    with pytest.raises((FileNotFoundError, VideoDecodeError), match="episode_000001.mp4"):
        ds.episode_video(1, "gripper")
    win = WindowDataset(ds, _data_cfg(), frame_cache="memory")
    with pytest.raises((FileNotFoundError, VideoDecodeError), match="episode_000001.mp4"):
        win[45]


def _encoder(video: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in VAE: [B,3,9,H,W] -> [B,6,3,H/8,W/8]."""
    pooled = torch.nn.functional.avg_pool3d(video, (1, 8, 8))
    lat = torch.cat([pooled[:, :, :1], pooled[:, :, 1:].reshape(*pooled.shape[:2], 2, 4, *pooled.shape[-2:]).mean(3)], 2)
    return torch.cat([lat, lat.square()], 1)


def test_latent_cache_resumes_after_interruption(dataset_dir, tmp_path):
    root = _copy_dataset(dataset_dir[0], tmp_path / "ds")
    win = WindowDataset(root, _data_cfg(), frame_cache="memory")
    ref = build_latent_cache(win, _encoder, tmp_path / "ref.npy", batch_size=8, progress=False)

    calls = {"n": 0}

    def flaky(video):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed mid-build
        return _encoder(video)

    out = tmp_path / "lat.npy"
    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(win, flaky, out, batch_size=8, progress=False)
    assert not out.exists()
    progress = json.loads((tmp_path / "lat.npy.progress.json").read_text())
    assert progress["done"] == 24

    # a corrupt video met while resuming names the file and keeps the finished batches
    bad = root / "videos/chunk-000/observation.images.corner/episode_000002.mp4"
    good = bad.read_bytes()
    bad.write_bytes(good[:200])
    win_bad = WindowDataset(root, _data_cfg(), frame_cache="memory")
    with pytest.raises(VideoDecodeError, match="episode_000002.mp4"):
        build_latent_cache(win_bad, _encoder, out, batch_size=8, progress=False)
    assert json.loads((tmp_path / "lat.npy.progress.json").read_text())["done"] == 48
    bad.write_bytes(good)

    seen = []
    build_latent_cache(WindowDataset(root, _data_cfg(), frame_cache="memory"),
                       lambda v: (seen.append(v.shape[0]), _encoder(v))[1], out, batch_size=8, progress=False)
    assert sum(seen) == 83 - 48  # only the unfinished windows were encoded
    np.testing.assert_array_equal(np.load(out), np.load(ref))
    assert np.load(out).dtype == np.float16

    cached = CachedWindowDataset(win, out)
    s, full = cached[45], win[45]
    assert "video" not in s and s["latents"].shape == (6, 3, S // 8, 2 * S // 8)
    torch.testing.assert_close(s["actions"], full["actions"])
    torch.testing.assert_close(s["latents"], _encoder(full["video"][None])[0], atol=2e-3, rtol=2e-3)
    b = collate_windows([cached[0], cached[1]])
    assert b["latents"].shape == (2, 6, 3, S // 8, 2 * S // 8)


def test_text_cache_file_round_trip(tmp_path):
    """The one text-cache format: build_text_cache writes it, TextContextCache.load reads it (shapes
    checked against the config), the prompt template is applied before encoding."""
    from lwam.config import TextConfig
    from lwam.model.text import TextContextCache, build_text_cache

    cfg = TextConfig(dim=8, max_tokens=4, encoder="cache", prompt_template="do: {instruction}")
    instr = ["press the button", "open the drawer", "reach", "reach"]
    seen = []

    def enc(prompts):
        seen.extend(prompts)
        return torch.stack([torch.full((4, 8), float(len(p))) for p in prompts])

    path = build_text_cache(instr, cfg, tmp_path / "text.safetensors", encoder=enc, batch_size=2)
    assert seen == ["do: press the button", "do: open the drawer", "do: reach"]  # each instruction once
    tc = TextContextCache.load(path, cfg)
    assert len(tc) == 3 and tc.instructions == instr[:3]
    ctx = tc.get(["open the drawer", "reach"])
    assert ctx.shape == (2, 4, 8) and float(ctx[0, 0, 0]) == len("do: open the drawer")
    with pytest.raises(KeyError, match="no cached text context"):
        tc.get(["never seen"])
    assert not list(tmp_path.glob(".*tmp*"))
    tc.add("never seen", torch.zeros(4, 8))
    tc.save(tmp_path / "again.safetensors")
    assert TextContextCache.load(tmp_path / "again.safetensors", cfg).instructions == [*instr[:3], "never seen"]
    with pytest.raises(ValueError, match="expected"):  # another config's shapes
        TextContextCache.load(path, TextConfig(dim=16, max_tokens=4))
    (tmp_path / "other.safetensors").write_bytes(path.read_bytes()[:40])
    with pytest.raises(Exception):
        TextContextCache.load(tmp_path / "other.safetensors", cfg)
