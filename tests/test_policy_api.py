"""The robot-facing Policy API (lwam.policy.observation, Policy.predict_action_chunk / select_action / reset) and its
eager counterpart lwam.policy.eager.EagerPolicy; load_policy's one documented fallback (tiny preset, CPU)."""
import numpy as np
import pytest
import torch

from lwam.config import get_preset
from lwam.policy.eager import EagerPolicy
from lwam.policy.compiled import Policy
from lwam.model.lightwam import LightWAM
from lwam.policy.observation import ObservationError, from_sim_observation, observation_spec, parse_observation
from lwam.testing import assert_close, perturb_zero_inits_

STATS = {"observation.state": {"min": [-2.0] * 4, "max": [3.0] * 4, "mean": [0.0] * 4, "std": [1.0] * 4},
         "action": {"min": [-0.5] * 4, "max": [1.5] * 4, "mean": [0.0] * 4, "std": [1.0] * 4}}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturb_zero_inits_(LightWAM(get_preset("tiny")).eval(), torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def policy(model):
    return Policy.from_model(model, stats=STATS, compile=False)


def _obs(cfg, seed=0, prompt_key="task", size=None):
    rng = np.random.default_rng(seed)
    obs = {}
    for key, s in observation_spec(cfg.data, cfg.proprio_dim).items():
        shape = tuple(s["shape"]) if size is None or key == "observation.state" else (size, size, 3)
        obs[key] = (rng.integers(0, 256, shape, dtype=np.uint8) if s["dtype"] == "uint8"
                    else rng.uniform(-2, 3, shape).astype(np.float32))
    obs[prompt_key] = "push the button"
    return obs


def test_spec_and_composition_as_training():
    """Cameras are taken in the dataset's order, rotated and placed as the training windows compose them."""
    cfg = get_preset("tiny").replace(**{"data.camera_layout": "libero", "data.rotate_180": True,
                                        "data.cameras": ("agentview", "wrist")})
    spec = observation_spec(cfg.data, cfg.proprio_dim)
    assert spec == {"observation.images.agentview": {"shape": [64, 64, 3], "dtype": "uint8"},
                    "observation.images.wrist": {"shape": [64, 64, 3], "dtype": "uint8"},
                    "observation.state": {"shape": [4], "dtype": "float32"}}
    rng = np.random.default_rng(3)
    a, w = (rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2))
    obs = parse_observation({"observation.images.wrist": w, "observation.images.agentview": a,
                             "observation.state": np.zeros(4, np.float32), "prompt": "x"}, cfg.data, 4)
    expected = np.concatenate([a[::-1, ::-1], w[::-1, ::-1]], axis=1)
    assert obs.images.shape == (1, 64, 128, 3) and np.array_equal(obs.images[0], expected)
    # LeRobot's float [3, h, w] in [0, 1] gives the same frame as uint8 [h, w, 3]
    f = {"observation.images.agentview": torch.from_numpy(a).permute(2, 0, 1).float() / 255,
         "observation.images.wrist": w.transpose(2, 0, 1).astype(np.float32) / 255,
         "observation.state": torch.zeros(4), "task": "x"}
    got = parse_observation(f, cfg.data, 4)
    assert np.array_equal(got.images[0], expected) and got.torch_out


def test_predict_action_chunk_equals_predict(policy, model):
    cfg = model.cfg
    obs = _obs(cfg, 1)
    chunk = policy.predict_action_chunk(obs)
    image = np.concatenate([obs["observation.images.corner"], obs["observation.images.gripper"]], axis=1)
    ref = policy.predict(image, "push the button", obs["observation.state"])
    assert isinstance(chunk, np.ndarray) and chunk.shape == (cfg.chunk_size, cfg.action_dim)
    assert np.array_equal(chunk, ref)
    # "prompt" (openpi) is the same as "task" (LeRobot); the eager counterpart agrees
    assert np.array_equal(policy.predict_action_chunk(_obs(cfg, 1, "prompt")), chunk)
    eager = EagerPolicy(model, STATS)
    assert_close(torch.from_numpy(eager.predict_action_chunk(obs)), torch.from_numpy(chunk), dtype=torch.float32)
    # other camera sizes are resized into the slots as in training
    assert policy.predict_action_chunk(_obs(cfg, 2, size=48)).shape == chunk.shape


def test_batched_and_torch_observations(policy, model):
    cfg = model.cfg
    o1, o2 = _obs(cfg, 4), _obs(cfg, 5)
    batched = {k: (np.stack([o1[k], o2[k]]) if k != "task" else ["push the button", "open the drawer"]) for k in o1}
    out = policy.predict_action_chunk(batched)
    assert out.shape == (2, cfg.chunk_size, cfg.action_dim)
    assert_close(torch.from_numpy(out[0]), torch.from_numpy(policy.predict_action_chunk(o1)), dtype=torch.float32)
    o2["task"] = "open the drawer"
    assert_close(torch.from_numpy(out[1]), torch.from_numpy(policy.predict_action_chunk(o2)), dtype=torch.float32)
    t = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in o1.items()}
    assert isinstance(policy.predict_action_chunk(t), torch.Tensor)


@pytest.mark.parametrize("cls", ["Policy", "EagerPolicy"])
def test_select_action_queue(policy, model, cls, monkeypatch):
    pol = policy if cls == "Policy" else EagerPolicy(model, STATS)
    cfg = model.cfg
    assert pol.executed_steps == cfg.data.executed_steps == 8  # from the checkpoint's config
    calls = []
    orig = type(pol).predict_action_chunk

    def counting(self, obs):
        calls.append(obs["observation.state"][0])
        return orig(self, obs)

    monkeypatch.setattr(type(pol), "predict_action_chunk", counting)
    pol.reset()
    pol.executed_steps = 3
    obs = [_obs(cfg, 10 + i) for i in range(7)]
    acts = [pol.select_action(o) for o in obs]
    assert len(calls) == 3  # steps 0, 3, 6 query; the others pop the queue
    first = orig(pol, obs[0])
    assert np.array_equal(np.stack(acts[:3]), first[:3])
    assert np.array_equal(acts[3], orig(pol, obs[3])[0])
    pol.reset()
    pol.select_action(obs[1])
    assert len(calls) == 4  # reset forgets the queue
    with pytest.raises(ValueError, match=r"executed_steps: expected an int in \[1, 32\]"):
        pol.executed_steps = 33
    pol.executed_steps = cfg.data.executed_steps
    pol.reset()


@pytest.mark.parametrize("cls", ["Policy", "EagerPolicy"])
def test_start_async_runs_chunks_ahead_and_aligns_them(policy, model, cls):
    """select_action with asynchronous execution: the chunk of the observation taken after s actions is
    executed from its action t - s on (the stale prefix dropped); reset and stop_async go back cleanly."""
    pol = policy if cls == "Policy" else EagerPolicy(model, STATS)
    obs = [_obs(model.cfg, 40 + i) for i in range(24)]
    chunks = [pol.predict_action_chunk(o) for o in obs]  # what each observation's chunk is
    pol.start_async(lead_steps=3)
    try:
        pol.reset()
        got = [pol.select_action(o) for o in obs]
        stats = pol.async_stats
        assert stats["requests"] >= 2 and stats["waits"] == 0  # a fast loop runs the first chunk past its horizon
        # every action equals action t - s of the chunk of some earlier observation s
        for t, a in enumerate(got):
            assert any(np.array_equal(a, chunks[s][t - s]) for s in range(t + 1)), t
        assert np.array_equal(got[0], chunks[0][0])
        pol.reset()
        assert pol.async_stats["requests"] == 0
    finally:
        pol.stop_async()
    assert pol.async_stats is None
    pol.reset()
    assert np.array_equal(pol.select_action(obs[0]), chunks[0][0])
    pol.reset()


@pytest.mark.parametrize("change, match", [
    (lambda o: o.pop("observation.state"), r"missing key 'observation.state'"),
    (lambda o: o.pop("observation.images.gripper"), r"missing key 'observation.images.gripper'"),
    (lambda o: o.pop("task"), r"expected key 'task' \(LeRobot\) or 'prompt'"),
    (lambda o: o.update({"observation.state": np.zeros(5, np.float32)}), r"observation.state: expected shape \[4\].*got \[5\]"),
    (lambda o: o.update({"observation.state": np.zeros(4, np.int64)}), r"observation.state: expected dtype float32, got int64"),
    (lambda o: o.update({"observation.state": np.array([0, np.nan, 0, 0], np.float32)}), r"observation.state: expected finite values, got nan at index \[1\]"),
    (lambda o: o.update({"observation.images.corner": np.zeros((64, 64), np.uint8)}), r"observation.images.corner: expected uint8 \[h, w, 3\].*got shape \[64, 64\]"),
    (lambda o: o.update({"observation.images.corner": np.zeros((64, 64, 3), np.int16)}), r"observation.images.corner: expected dtype uint8.*got int16"),
    (lambda o: o.update({"observation.images.corner": np.full((3, 8, 8), 2.0, np.float32)}), r"expected float values in \[0, 1\], got range \[2, 2\]"),
    (lambda o: o.update({"task": 3}), r"task: expected a str, got int"),
    (lambda o: o.update({"prompt": "another"}), r"'task' \('push the button'\) and 'prompt' \('another'\) differ"),
])
def test_observation_errors(policy, model, change, match):
    obs = _obs(model.cfg, 0)
    change(obs)
    with pytest.raises(ObservationError, match=match):
        policy.predict_action_chunk(obs)


def test_from_sim_observation(policy, model):
    rng = np.random.default_rng(0)
    sim = {"images": {"corner": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
                      "gripper": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)},
           "proprio": [0.1, 0.2, 0.3, 0.4], "instruction": "push the button"}
    obs = from_sim_observation(sim)
    assert set(obs) == {"observation.images.corner", "observation.images.gripper", "observation.state", "task"}
    assert policy.predict_action_chunk(obs).shape == (32, 4)


def test_load_policy_falls_back_only_on_compile_failure(model, monkeypatch):
    import torch._dynamo.exc as dynamo_exc

    from lwam.policy import loading

    warnings = []
    monkeypatch.setattr(loading.logger, "warning", lambda msg: warnings.append(msg))
    real_warmup = Policy.warmup

    def failing_when_compiled(self, *a, **k):
        if self.options.compile:
            raise dynamo_exc.BackendCompilerFailed(lambda *x: None, RuntimeError("no C++ compiler"), None)
        return real_warmup(self, *a, **k)

    monkeypatch.setattr(Policy, "warmup", failing_when_compiled)
    pol = loading.load_policy(model, STATS)
    assert isinstance(pol, Policy) and not pol.options.compile
    assert len(warnings) == 1 and "torch.compile failed" in warnings[0] and "compile=False" in warnings[0]

    def other_failure(self, *a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Policy, "warmup", other_failure)
    with pytest.raises(RuntimeError, match="out of memory"):  # no silent swap to another implementation
        loading.load_policy(model, STATS)
    assert isinstance(loading.load_policy(model, STATS, eager=True), EagerPolicy)
