"""The robot-facing policies and what they read and return.

- base.py         RobotPolicy (THE contract: executed_steps, select_action, reset) and ModelPolicy
- observation.py  LeRobot-style observation dicts -> composed frame, proprio, instruction; ActionQueue
- inputs.py       image conversion, normalisation statistics and text caches of in-process policies
- compiled.py     Policy: the transformed, compiled (CUDA-graph captured) single-pass action decoder
- eager.py        EagerPolicy: the plain model behind the same contract (the reference, debugging)
- remote.py       RemotePolicy: the contract over a websocket to ``lwam serve``
- loading.py      load_policy: THE loader of a warmed-up policy (compile fallback in one place)
"""
from __future__ import annotations

from lwam._lazy import lazy_getattr, lazy_names

_LAZY = lazy_names({
    "lwam.policy.base": ("RobotPolicy", "ModelPolicy"),
    "lwam.policy.compiled": ("Policy", "InferenceOptions"),
    "lwam.policy.eager": ("EagerPolicy",),
    "lwam.policy.remote": ("RemotePolicy",),
    "lwam.policy.loading": ("load_policy",),
    "lwam.policy.exported": ("ExportedPolicy", "load_exported"),
})

__all__ = list(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
