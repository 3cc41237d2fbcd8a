"""`lwam experiment`: the no-video-co-training condition, the report's arithmetic, and the grid end to end
(shared stage built once, runs in worker processes, resume, refusal of a changed config)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lwam.config import ImplConfig, get_preset
from lwam.experiment import CONDITIONS, ExperimentConfig, run_config
from lwam.experiment_report import build_report, markdown_table, summarize, write_report
from lwam.model.lightwam import LightWAM


def _batch(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.latent_hw()
    return {"latents": torch.randn(b, cfg.vae.z_dim, cfg.latent_frames(), h, w, generator=g),
            "instruction": ["press the button", "open the drawer"][:b],
            "proprio": torch.randn(b, cfg.proprio_dim, generator=g),
            "actions": torch.rand(b, cfg.chunk_size, cfg.action_dim, generator=g) * 2 - 1}


def test_no_video_condition_skips_the_video_pass_and_trains_on_the_action_loss_alone():
    cfg = get_preset("tiny").replace(**{"train.video_loss_weight": 0.0})
    torch.manual_seed(0)
    model = LightWAM(cfg, build_vae=False, impl=ImplConfig(fused_pooling=False))
    batch = _batch(cfg)

    def no_call(*a, **k):
        raise AssertionError("the video pass ran with video_loss_weight = 0")

    model.video_pass, video_pass = no_call, model.video_pass
    loss, metrics = model.training_loss(batch)
    loss.backward()
    assert float(metrics["video_loss"]) == 0.0 and torch.equal(loss, metrics["action_loss"])
    grads = {n: p.grad.clone() for n, p in model.trainable_parameters() if p.grad is not None}
    assert not any("dit.head" in n for n in grads)  # the video head takes no part
    # The same gradients as the action loss of the full two-pass objective alone.
    model.video_pass = video_pass
    model.zero_grad(set_to_none=True)
    m_act = model.action_loss(model.action_pass(batch["latents"][:, :, :1],
                                                model.context(model.text_context(batch, "cpu"), batch["proprio"])),
                              batch["actions"], None)
    m_act.backward()
    for n, g in grads.items():
        torch.testing.assert_close(dict(model.trainable_parameters())[n].grad, g, rtol=1e-5, atol=1e-7, msg=n)


def test_conditions_change_one_thing():
    from lwam.demo import DemoConfig

    d = DemoConfig()
    base = run_config(d, "video", 3)
    assert base.train.seed == 3 and base.train.video_loss_weight == 1.0
    assert run_config(d, "no_video", 3).train.video_loss_weight == 0.0
    assert run_config(d, "full_res_video", 3).train.video_downsample == 1
    assert run_config(d, "full_chunk_loss", 3).train.action_loss_steps == base.data.chunk_size
    for name in CONDITIONS:
        cfg = run_config(d, name, 3)
        changed = {k for k in ("video_loss_weight", "video_downsample", "action_loss_steps")
                   if getattr(cfg.train, k) != getattr(base.train, k)}
        assert len(changed) <= 1, (name, changed)
    with pytest.raises(ValueError, match="unknown"):
        ExperimentConfig(conditions=("video", "nope")).validate()
    with pytest.raises(ValueError, match="seeds"):
        ExperimentConfig(seeds=(1, 1)).validate()


def _fake_experiment(out, success, blind):
    """success[cond][seed] = {task: rate}: an experiment directory as the runs leave it."""
    tasks = ["a-v3", "b-v3"]
    cfg = ExperimentConfig(seeds=(0, 1, 2), conditions=tuple(success))
    cfg.demo.tasks = tuple(tasks)
    (out / "shared").mkdir(parents=True)
    (out / "experiment.json").write_text(json.dumps(cfg.to_dict()))
    (out / "shared" / "shared.json").write_text(json.dumps(
        {"stage_seconds": {"collect": 10.0, "train_vae": 20.0}, "demos": {}, "windows": 5, "vae": {}}))
    for c, per_seed in success.items():
        for s, rates in per_seed.items():
            d = out / "runs" / c / f"seed_{s}"
            d.mkdir(parents=True)
            b = blind[c][s]
            d.joinpath("result.json").write_text(json.dumps({
                "condition": c, "seed": s, "success": rates, "success_rate": float(np.mean(list(rates.values()))),
                "blind_success": b, "blind_success_rate": float(np.mean(list(b.values()))), "eval_seed_start": 7,
                "train": {"steps_per_s": 1.0, "final": {}}, "stage_seconds": {"train": 100.0 + s, "eval": 5.0},
                "device": "cpu", "commit": "abc"}))
    return tasks


def test_report_statistics_paired_effects_and_table(tmp_path):
    success = {"video": {0: {"a-v3": 1.0, "b-v3": 0.9}, 1: {"a-v3": 0.7, "b-v3": 1.0}, 2: {"a-v3": 1.0, "b-v3": 0.8}},
               "no_video": {0: {"a-v3": 0.6, "b-v3": 0.9}, 1: {"a-v3": 0.7, "b-v3": 0.5}, 2: {"a-v3": 0.2, "b-v3": 0.8}}}
    zero = {"a-v3": 0.0, "b-v3": 0.0}
    blind = {c: {s: dict(zero, **({"b-v3": 0.1} if (c, s) == ("video", 2) else {})) for s in range(3)}
             for c in success}
    _fake_experiment(tmp_path, success, blind)
    r = write_report(tmp_path)
    a = r["success"]["video"]["per_task"]["a-v3"]
    assert a["values"] == [1.0, 0.7, 1.0] and a["n"] == 3
    assert a["mean"] == pytest.approx(0.9) and a["std"] == pytest.approx(np.std([1.0, 0.7, 1.0], ddof=1))
    assert (a["min"], a["max"]) == (0.7, 1.0)
    assert r["success"]["video+blind"]["per_task"]["b-v3"]["values"] == [0.0, 0.0, 0.1]
    eff = r["paired_effects"]["video - no_video"]
    np.testing.assert_allclose(eff["values"], [0.95 - 0.75, 0.85 - 0.6, 0.9 - 0.5])
    assert r["runs"] == 6 and r["seeds"] == [0, 1, 2]
    assert r["stage_seconds_mean_per_run"]["video:train"] == pytest.approx(101.0)
    table = markdown_table(r)
    assert "| video | 90 ± 17 (100, 70, 100) |" in table
    assert "| no_video+blind |" in table
    assert (tmp_path / "report.md").read_text().count("\n") > 8
    assert os.path.getsize(tmp_path / "ablation.png") > 5000
    assert summarize([0.5])["std"] == 0.0
    # A missing run is simply not in the report (finished runs only).
    (tmp_path / "runs" / "no_video" / "seed_2" / "result.json").unlink()
    r = build_report(tmp_path)
    assert r["success"]["no_video"]["seeds"] == [0, 1] and r["paired_effects"]["video - no_video"]["n"] == 2


def test_statistics_t_interval_mcnemar_and_episode_bootstrap():
    from lwam.experiment_report import episode_analysis, mcnemar_exact, t_interval, t_quantile

    # Student's t 0.975 quantiles (any statistics table): df 1 12.706, df 7 2.365, df 30 2.042.
    for df, q in ((1, 12.706), (7, 2.365), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(q, abs=2e-3)
    ti = t_interval([0.1, 0.0, 0.2, 0.1])
    sem = np.std([0.1, 0.0, 0.2, 0.1], ddof=1) / 2
    assert ti["mean"] == pytest.approx(0.1) and ti["df"] == 3
    np.testing.assert_allclose(ti["ci"], [0.1 - t_quantile(0.975, 3) * sem, 0.1 + t_quantile(0.975, 3) * sem])
    assert t_interval([0.3])["ci"] is None
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64) and mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    # seed 0: 3 pairs only the reference succeeds, seed 1: every pair agrees.
    pairs = {0: {"a": np.array([[1, 0], [1, 0], [1, 0], [1, 1]])}, 1: {"a": np.array([[1, 1], [0, 0], [1, 1], [0, 0]])}}
    ep = episode_analysis(pairs, n_boot=2000)
    assert (ep["both"], ep["only_ref"], ep["only_other"], ep["neither"], ep["pairs"]) == (3, 3, 0, 2, 8)
    assert ep["mean_difference"] == pytest.approx(3 / 8) and ep["mcnemar_p"] == pytest.approx(0.25)
    lo, hi = ep["episode_bootstrap_ci"]
    assert 0 <= lo < 3 / 8 < hi <= 1
    hlo, hhi = ep["hierarchical_bootstrap_ci"]
    assert hlo <= lo and hhi >= hi  # resampling seeds too: seed 1 alone (0) and seed 0 alone (0.75) are drawn


def test_report_pairs_episodes_and_shows_the_shuffled_control(tmp_path):
    success = {"video": {s: {"a-v3": 1.0, "b-v3": 0.5} for s in range(3)},
               "no_video": {s: {"a-v3": 0.5, "b-v3": 0.5} for s in range(3)}}
    blind = {c: {s: {"a-v3": 0.0, "b-v3": 0.0} for s in range(3)} for c in success}
    _fake_experiment(tmp_path, success, blind)
    for c in success:
        for s in range(3):
            p = tmp_path / "runs" / c / f"seed_{s}" / "result.json"
            r = json.loads(p.read_text())
            r["episodes"] = {"a-v3": [1, 1] if c == "video" else [1, 0], "b-v3": [0, 1]}
            r["controls"] = {"shuffled": {"success": {"a-v3": 0.5, "b-v3": 0.0}, "success_rate": 0.25,
                                          "episodes": {"a-v3": [1, 0], "b-v3": [0, 0]}}}
            p.write_text(json.dumps(r))
    (tmp_path / "sessions.json").write_text(json.dumps([{"started_utc": "t0", "ended_utc": "t1", "wall_seconds": 60.0,
                                                         "jobs": 2, "runs_finished": 6, "cpu_count": 2}]))
    r = write_report(tmp_path)
    eff = r["paired_effects"]["video - no_video"]
    assert eff["mean"] == pytest.approx(0.25) and eff["t_interval"]["ci"] == pytest.approx([0.25, 0.25])
    assert eff["per_task"]["b-v3"]["mean"] == 0.0
    ep = eff["episodes"]
    assert (ep["pairs"], ep["only_ref"], ep["only_other"], ep["both"], ep["neither"]) == (12, 3, 0, 6, 3)
    assert r["success"]["video+shuffled"]["per_task"]["a-v3"]["values"] == [0.5] * 3
    assert r["control_effects"]["video - video+shuffled"]["mean"] == pytest.approx(0.75 - 0.25)
    assert r["control_effects"]["no_video - no_video+blind"]["mean"] == pytest.approx(0.5)
    assert r["wall_seconds"] == 60.0 and r["stage_seconds_total"] == pytest.approx(30 + 3 * 2 * 5 + 2 * (300 + 3))
    md = (tmp_path / "report.md").read_text()
    assert "| video+shuffled |" in md and "McNemar" in md and "95 % CI" in md and "Wall time: 60 s" in md


def test_camera_and_image_size_options_and_old_experiment_configs():
    from lwam.demo import DemoConfig, demo_model_config
    from lwam.experiment import _same_runs

    cfg = demo_model_config(DemoConfig(cameras=("corner4", "gripper"), image_size=96))
    assert cfg.data.cameras == ("corner4", "gripper") and (cfg.data.image_height, cfg.data.image_width) == (96, 192)
    assert demo_model_config(DemoConfig()).data.image_width == 128
    with pytest.raises(ValueError, match="image_height"):
        demo_model_config(DemoConfig(image_size=80))
    new = ExperimentConfig().to_dict()
    old = json.loads(json.dumps(new))
    for k in ("cameras", "image_size", "shuffled_control"):
        del old["demo"][k]  # an experiment.json written before these options
    assert _same_runs(old, new) and ExperimentConfig.from_dict(old).demo.cameras == ("corner", "gripper")
    other = ExperimentConfig(demo=DemoConfig(cameras=("corner4", "gripper"))).to_dict()
    assert not _same_runs(new, other)


def test_stop_file_ends_the_grid_after_the_running_run(tmp_path, monkeypatch):
    import lwam.experiment as ex
    import lwam.experiment_report as rep

    ran = []

    def fake_run(out, cfg, c, s, device, progress):
        ran.append((c, s))
        ex.run_dir(out, c, s).mkdir(parents=True)
        (ex.run_dir(out, c, s) / "result.json").write_text("{}")
        (out / ex.STOP_FILE).touch()  # a stop request while the first run is going
        return {"success": {}, "controls": {}}

    monkeypatch.setattr(ex, "prepare_shared", lambda *a, **k: {})
    monkeypatch.setattr(ex, "run_one", fake_run)
    monkeypatch.setattr(rep, "write_report", lambda out: {"stopped": True})
    (tmp_path / ex.STOP_FILE).touch()  # left by an earlier call: removed at the start
    cfg = ExperimentConfig(seeds=(0, 1), conditions=("video", "no_video"))
    assert ex.run_experiment(tmp_path, cfg, progress=False, device="cpu") == {"stopped": True}
    assert ran == [("video", 0)]
    sessions = json.loads((tmp_path / "sessions.json").read_text())
    assert len(sessions) == 1 and sessions[0]["runs_finished"] == 1 and sessions[0]["wall_seconds"] >= 0


def test_experiment_modules_import_without_a_cycle():
    code = ("import sys; import lwam.experiment_report as r; "
            "assert 'lwam.experiment' not in sys.modules, 'the report imports the runner'; "
            "import lwam.experiment as e; assert e.CONDITIONS is r.CONDITIONS")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


pytest.importorskip("metaworld")


def _lwam(*args, timeout=900):
    env = dict(os.environ, MUJOCO_GL="egl")
    env.pop("TRITON_INTERPRET", None)  # the experiment runs the model the way a user would
    return subprocess.run([sys.executable, "-m", "lwam.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_quick_experiment_grid_parallel_resume_and_refusal(tmp_path):
    out = tmp_path / "exp"
    cams = ("--cameras", "corner4", "gripper")
    r = _lwam("experiment", "--quick", "--out", str(out), "--seeds", "0", "1", "--conditions", "video", "no_video",
              "--jobs", "2", "--no-progress", *cams)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["runs"] == 4 and set(report["success"]) == {f"{c}{k}" for c in ("video", "no_video")
                                                              for k in ("", "+blind", "+shuffled")}
    assert report["cameras"] == ["corner4", "gripper"] and report["wall_seconds"] > 0
    assert "episodes" in report["paired_effects"]["video - no_video"]
    assert json.loads((out / "shared" / "dataset" / "meta" / "info.json").read_text())["features"].keys() >= {
        "observation.images.corner4", "observation.images.gripper"}
    assert "| video |" in r.stdout
    for c in ("video", "no_video"):
        for s in (0, 1):
            res = json.loads((out / "runs" / c / f"seed_{s}" / "result.json").read_text())
            assert res["train"]["steps"] == 6 and (out / "runs" / c / f"seed_{s}" / "checkpoint").is_dir()
            assert (res["train"]["final"]["video_loss"] == 0.0) == (c == "no_video")
    # Seed s of every condition starts from the same weights (and the shared VAE); another seed does not.
    from lwam.demo import DemoConfig
    from lwam.experiment import _model_with_shared_vae

    q = DemoConfig.quick()
    q.cameras = ("corner4", "gripper")
    init = {(c, s): _model_with_shared_vae(out / "shared", run_config(q, c, s), "cpu", seed=s).state_dict()
            for c, s in (("video", 0), ("no_video", 0), ("video", 1))}
    assert all(torch.equal(v, init[("no_video", 0)][k]) for k, v in init[("video", 0)].items())
    assert not all(torch.equal(v, init[("video", 1)][k]) for k, v in init[("video", 0)].items())
    assert all(torch.equal(init[("video", 0)][k], init[("video", 1)][k]) for k in init[("video", 0)] if k.startswith("vae."))
    for fig in report["figures"].values():
        assert os.path.getsize(out / fig) > 1000, fig
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed_*/result.json")}
    shared_mtime = (out / "shared" / "vae" / "vae.safetensors").stat().st_mtime_ns

    # Resume with one more seed of one condition: only that run trains, nothing shared is rebuilt.
    r = _lwam("experiment", "--quick", "--out", str(out), "--seeds", "2", "--conditions", "video", "--no-progress",
              *cams)
    assert r.returncode == 0, r.stderr[-4000:]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert (out / "shared" / "vae" / "vae.safetensors").stat().st_mtime_ns == shared_mtime
    report = json.loads((out / "report.json").read_text())
    assert report["runs"] == 5 and report["success"]["video"]["seeds"] == [0, 1, 2]
    assert len(json.loads((out / "sessions.json").read_text())) == 2

    # Other budgets into the same directory are refused (they would mix two experiments).
    r = _lwam("experiment", "--quick", "--out", str(out), "--train-steps", "7", "--no-progress", *cams)
    assert r.returncode == 2 and "other settings" in r.stderr
