"""The public API, pinned: the names each package face exports, that they are the objects they name, and
the signatures users call. A change here is a change users see (say so in the changelog)."""
import dataclasses
import inspect

import torch

import lwam
import lwam.data
import lwam.model
import lwam.modules
import lwam.ops
import lwam.policy

FACES = {
    lwam: {"ImplConfig", "LightWAMConfig", "get_preset", "__version__", "LightWAM", "Policy", "Trainer",
           "save_checkpoint", "load_checkpoint", "TextContextCache", "build_text_cache", "load_policy",
           "load_exported"},
    lwam.policy: {"RobotPolicy", "ModelPolicy", "Policy", "InferenceOptions", "EagerPolicy", "RemotePolicy",
                  "load_policy", "ExportedPolicy", "load_exported"},
    lwam.ops: {"query_pool", "query_pool_kernel_available", "latent_downsample"},
    lwam.modules: {"LearnedQueryPooler", "MultiLayerQueryPooler", "FoldedQueryPooling", "pool_layers",
                   "fold_for_inference", "apply_fused_pooling", "is_learned_query_pooler"},
    lwam.model: {"LightWAM", "WanDiT", "DiTBlock", "WanVAE", "FrameEncoder", "StateFusionActionExpert",
                 "FlowMatching", "TextContextCache", "build_text_cache", "make_text_encoder", "check_frozen"},
    lwam.data: {"LeRobotReader", "LeRobotWriter", "WindowDataset", "collate_windows", "Normalizer",
                "dataset_stats", "CachedWindowDataset", "build_latent_cache"},
}


def test_faces_export_exactly_the_public_names():
    for face, names in FACES.items():
        assert set(face.__all__) == names, face.__name__
        for name in names:
            assert getattr(face, name) is not None, f"{face.__name__}.{name}"


def test_faces_give_the_objects_themselves():
    from lwam.checkpoint import load_checkpoint, save_checkpoint
    from lwam.data.lerobot.reader import LeRobotReader
    from lwam.policy.compiled import Policy
    from lwam.model.lightwam import LightWAM
    from lwam.model.text import TextContextCache
    from lwam.train import Trainer

    assert (lwam.load_checkpoint, lwam.save_checkpoint) == (load_checkpoint, save_checkpoint)
    assert (lwam.Policy, lwam.Trainer, lwam.LightWAM) == (Policy, Trainer, LightWAM)
    assert lwam.TextContextCache is TextContextCache is lwam.model.TextContextCache
    assert lwam.data.LeRobotReader is LeRobotReader
    assert lwam.model.LightWAM is LightWAM
    import lwam.modules.query_pool as qp
    assert all(getattr(lwam.modules, n) is getattr(qp, n) for n in qp.__all__)


def test_ops_face_gives_the_ops_not_their_modules():
    from lwam.ops import latent_downsample, query_pool

    assert callable(query_pool) and callable(latent_downsample)
    assert not inspect.ismodule(query_pool) and not inspect.ismodule(latent_downsample)
    x = torch.arange(2 * 3 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 3, 1, 4, 4)
    torch.testing.assert_close(latent_downsample(x, 2), torch.nn.functional.avg_pool3d(x, (1, 2, 2)))
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(2, 1, 5, 8, generator=g)           # [L, B, S, D]
    A = torch.randn(2, 8, 2 * 3, generator=g)          # [L, D, H*Q], H=2, Q=3
    w = torch.softmax(torch.randn(2, 3, generator=g), -1)
    assert query_pool(xs, A, w, 1e-5).shape == (2, 1, 2, 8)


def _params(fn):
    return list(inspect.signature(fn).parameters)


def test_signatures_users_call():
    from lwam.policy.compiled import Policy

    assert _params(Policy.from_checkpoint) == ["path", "device", "dtype", "kwargs"]
    assert _params(Policy.predict) == ["self", "images", "instruction", "proprio"]
    assert _params(Policy.predict_batch) == ["self", "images", "instructions", "proprio"]
    assert _params(lwam.Trainer.__init__)[:5] == ["self", "model", "dataset", "out_dir", "cfg"]
    assert "impl" in _params(lwam.Trainer.__init__)
    assert _params(lwam.save_checkpoint) == ["model", "path", "stats", "trainer_state"]
    assert _params(lwam.load_checkpoint) == ["path", "device"]
    assert _params(lwam.LightWAM.set_impl) == ["self", "impl"]
    assert [f.name for f in dataclasses.fields(lwam.ImplConfig)] == [
        "attention", "rope", "rope_cache", "fused_pooling", "fused_downsample", "compile_blocks"]
    assert _params(lwam.TextContextCache.load) == ["path", "cfg", "encoder"]
    assert _params(lwam.build_text_cache) == ["instructions", "cfg", "path", "encoder", "batch_size"]
    assert _params(lwam.load_policy) == ["source", "stats", "device", "eager", "compiled", "text_cache",
                                         "batch_sizes"]
    for cls in (lwam.policy.Policy, lwam.policy.EagerPolicy, lwam.policy.RemotePolicy):  # one contract
        assert issubclass(cls, lwam.policy.RobotPolicy)
        assert _params(cls.select_action) == ["self", "observation"]
        assert _params(cls.predict_action_chunk) == ["self", "observation"]
