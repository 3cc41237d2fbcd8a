"""The report of an ``lwam experiment``: per condition and task, closed-loop success over seeds (mean, spread,
every seed's value), the image controls (blind, shuffled), the paired effect of each condition against the first
one, the effect of each control, real wall time and time per stage; written as ``report.json``, ``report.md``
and two figures.

The paired effect is given two ways. Across seeds: seed s of every condition shares its initial weights, its
batches and its evaluation episodes, so the per-seed difference of the mean success over tasks is one paired
observation; its mean gets a t-based 95 % interval over the seeds (the primary figure: it counts the variation
between training seeds). Per episode: the same evaluation seed in both arms is a pair; the report counts the
discordant pairs, gives McNemar's exact test on them, and two bootstrap intervals of the mean difference: over
episode pairs alone (ignores that episodes of one seed share a policy: too narrow when seeds differ), and
hierarchical (seeds resampled, then episode pairs within each seed and task).

Reads only what the runs wrote (``runs/<condition>/seed_<s>/result.json``, ``shared/shared.json``,
``experiment.json``), so it can be rebuilt at any time: ``lwam experiment --report-only --out DIR``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from lwam._atomic import atomic_write_json, atomic_write_text
from lwam._env import environment
from lwam.experiment_conditions import CONDITIONS, CONTROLS

BLIND = "blind"
SHUFFLED = "shuffled"
N_BOOTSTRAP = 10_000


# --- statistics ----------------------------------------------------------------------------------------------
def _t_cdf(x: float, df: int) -> float:
    """Student's t CDF at ``x`` with ``df`` degrees of freedom (Simpson's rule on the density, 4000 panels)."""
    if x < 0:
        return 1.0 - _t_cdf(-x, df)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    n = 4000
    t = np.linspace(0.0, x, n + 1)
    f = c * (1.0 + t * t / df) ** (-(df + 1) / 2)
    h = x / n
    return 0.5 + float(h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` >= 1 degrees of freedom (bisection)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile: expected 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def t_interval(values: list[float], level: float = 0.95) -> dict[str, Any]:
    """Mean of ``values`` with its t-based ``level`` interval: {"mean", "sem", "ci": [lo, hi] or None (n < 2),
    "t", "df", "level"}."""
    v = np.asarray(values, dtype=float)
    n = len(v)
    if n < 2:
        return {"mean": float(v.mean()), "sem": None, "ci": None, "t": None, "df": 0, "level": level}
    sem = float(v.std(ddof=1) / math.sqrt(n))
    t = t_quantile(0.5 + level / 2, n - 1)
    return {"mean": float(v.mean()), "sem": sem, "ci": [float(v.mean() - t * sem), float(v.mean() + t * sem)],
            "t": round(t, 4), "df": n - 1, "level": level}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of ``b`` and ``c`` discordant pairs (binomial test of b in b + c at 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return float(min(1.0, 2 * tail))


def episode_pairs(ref: dict[str, Any], other: dict[str, Any], tasks: list[str]) -> np.ndarray:
    """The paired episode outcomes of two runs of the same seed: int [E, 2] (ref, other) over every task's
    episodes in order (episode i of a task has the same evaluation seed in both runs)."""
    rows = []
    for t in tasks:
        a, b = ref["episodes"][t], other["episodes"][t]
        if len(a) != len(b):
            raise ValueError(f"task {t}: {len(a)} and {len(b)} episodes cannot be paired")
        rows += list(zip(a, b))
    return np.asarray(rows, dtype=int).reshape(-1, 2)


def episode_analysis(pairs_by_seed: dict[int, dict[str, np.ndarray]], level: float = 0.95,
                     n_boot: int = N_BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Per-episode paired analysis. ``pairs_by_seed[s][task]``: int [E, 2] outcomes (ref, other) of the same
    episodes. Returns counts (both / only_ref / only_other / neither), the mean difference ref - other over all
    episode pairs, McNemar's exact p-value, and percentile bootstrap intervals of that mean: over episode pairs
    (``episode_bootstrap_ci``) and hierarchical (``hierarchical_bootstrap_ci``: seeds with replacement, then
    each chosen seed's pairs with replacement within each task)."""
    seeds = sorted(pairs_by_seed)
    allp = np.concatenate([p for s in seeds for p in pairs_by_seed[s].values()])
    a, b = allp[:, 0], allp[:, 1]
    only_ref, only_other = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    d = (a - b).astype(float)
    rng = np.random.default_rng(seed)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    ep = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    diffs = {s: {t: (p[:, 0] - p[:, 1]).astype(float) for t, p in pairs_by_seed[s].items()} for s in seeds}
    hier = np.empty(n_boot)
    for i in range(n_boot):
        tot, cnt = 0.0, 0
        for s in rng.choice(seeds, size=len(seeds)):
            for dt in diffs[s].values():
                tot += dt[rng.integers(0, len(dt), size=len(dt))].sum()
                cnt += len(dt)
        hier[i] = tot / cnt
    return {"pairs": int(len(d)), "seeds": seeds, "both": int(((a == 1) & (b == 1)).sum()), "only_ref": only_ref,
            "only_other": only_other, "neither": int(((a == 0) & (b == 0)).sum()), "mean_difference": float(d.mean()),
            "mcnemar_p": mcnemar_exact(only_ref, only_other),
            "episode_bootstrap_ci": [float(x) for x in np.percentile(ep, q)],
            "hierarchical_bootstrap_ci": [float(x) for x in np.percentile(hier, q)],
            "level": level, "n_boot": n_boot}


def control_result(r: dict[str, Any], control: str) -> dict[str, Any] | None:
    """A run's result of one image control: {"success", "success_rate", "episodes"} or None (not run). Runs
    written before the shuffled control keep the blind one under ``blind_*`` keys."""
    c = (r.get("controls") or {}).get(control)
    if c is not None:
        return c
    if control == BLIND and r.get("blind_success") is not None:
        return {"success": r["blind_success"], "success_rate": r["blind_success_rate"],
                "episodes": r.get("blind_episodes")}
    return None


def summarize(values: list[float]) -> dict[str, Any]:
    """Success rates of the seeds -> {"mean", "std" (sample std, 0 for one seed), "min", "max", "n", "values"}."""
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(len(v)), "values": [float(x) for x in v]}


def load_results(out: Path) -> list[dict[str, Any]]:
    """Every finished run's result.json, ordered by (condition order of experiment.json, seed)."""
    cfg = json.loads((out / "experiment.json").read_text())
    order = {c: i for i, c in enumerate(cfg["conditions"])}
    rows = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/seed_*/result.json"))]
    return sorted(rows, key=lambda r: (order.get(r["condition"], len(order)), r["seed"]))


def build_report(out: str | os.PathLike) -> dict[str, Any]:
    """The report dict of the experiment in ``out`` (finished runs only)."""
    out = Path(out)
    if not (out / "experiment.json").is_file() or not (out / "shared" / "shared.json").is_file():
        raise FileNotFoundError(f"{out}: no experiment here (experiment.json and shared/shared.json are written by "
                                f"`lwam experiment --out {out}`)")
    cfg = json.loads((out / "experiment.json").read_text())
    shared = json.loads((out / "shared" / "shared.json").read_text())
    results = load_results(out)
    if not results:
        raise ValueError(f"{out}: no finished run yet (runs/*/seed_*/result.json)")
    tasks = list(cfg["demo"]["tasks"])
    conditions = [c for c in cfg["conditions"] if any(r["condition"] == c for r in results)]

    table: dict[str, Any] = {}
    for c in conditions:
        rs = [r for r in results if r["condition"] == c]
        entry = {"label": CONDITIONS[c].label if c in CONDITIONS else c, "seeds": [r["seed"] for r in rs],
                 "per_task": {t: summarize([r["success"][t] for r in rs]) for t in tasks},
                 "mean_over_tasks": summarize([r["success_rate"] for r in rs])}
        table[c] = entry
        for control in CONTROLS:
            done = [(r, control_result(r, control)) for r in rs if control_result(r, control) is not None]
            if done:
                table[f"{c}+{control}"] = {
                    "label": f"{control} control of '{c}': {CONTROLS[control]}",
                    "seeds": [r["seed"] for r, _ in done],
                    "per_task": {t: summarize([cr["success"][t] for _, cr in done]) for t in tasks},
                    "mean_over_tasks": summarize([cr["success_rate"] for _, cr in done])}

    # Paired effect against the first condition: seed s of every condition shares its initial weights, data
    # order and evaluation episodes, so the per-seed difference isolates what the condition changes.
    effects: dict[str, Any] = {}
    ref = conditions[0]
    by = {(r["condition"], r["seed"]): r for r in results}
    for c in conditions[1:]:
        seeds = sorted(s for (cc, s) in by if cc == c and (ref, s) in by)
        if seeds:
            diffs = [by[(ref, s)]["success_rate"] - by[(c, s)]["success_rate"] for s in seeds]
            eff = {"seeds": seeds, **summarize(diffs), "t_interval": t_interval(diffs),
                   "per_task": {t: {**summarize([by[(ref, s)]["success"][t] - by[(c, s)]["success"][t]
                                                 for s in seeds]),
                                    "t_interval": t_interval([by[(ref, s)]["success"][t] - by[(c, s)]["success"][t]
                                                              for s in seeds])} for t in tasks}}
            if all(by[(k, s)].get("episodes") for k in (ref, c) for s in seeds):
                eff["episodes"] = episode_analysis(
                    {s: {t: episode_pairs({"episodes": {t: by[(ref, s)]["episodes"][t]}},
                                          {"episodes": {t: by[(c, s)]["episodes"][t]}}, [t]) for t in tasks}
                     for s in seeds})
            effects[f"{ref} - {c}"] = eff

    # Effect of each control within a condition: the same policy with its own images minus the control's
    # images, per seed (how much the success depends on seeing the episode's own scene).
    control_effects: dict[str, Any] = {}
    for r in results:
        for control in CONTROLS:
            cr = control_result(r, control)
            if cr is not None:
                control_effects.setdefault(f"{r['condition']} - {r['condition']}+{control}", []).append(
                    (r["seed"], r["success_rate"] - cr["success_rate"]))
    control_effects = {k: {"seeds": [s for s, _ in v], **summarize([d for _, d in v]),
                           "t_interval": t_interval([d for _, d in v])} for k, v in control_effects.items()}

    sessions_path = out / "sessions.json"
    sessions = json.loads(sessions_path.read_text()) if sessions_path.exists() else []

    stage_seconds = {k: v for k, v in shared["stage_seconds"].items()}
    per_run = {}
    for r in results:
        for k, v in r["stage_seconds"].items():
            per_run.setdefault(f"{r['condition']}:{k}", []).append(v)
    first = results[0]
    return {
        "tasks": tasks,
        "conditions": conditions,
        "seeds": sorted({r["seed"] for r in results}),
        "runs": len(results),
        "success": table,
        "paired_effects": effects,
        "control_effects": control_effects,
        "eval_episodes_per_task": cfg["demo"]["eval_episodes"],
        "blind_episodes_per_task": cfg.get("blind_episodes") or cfg["demo"]["eval_episodes"],
        "eval_seed_start": first["eval_seed_start"],
        "cameras": first.get("cameras") or cfg["demo"].get("cameras") or ["corner", "gripper"],
        "image_size": first.get("image_size") or cfg["demo"].get("image_size") or 64,
        "per_seed": [{"condition": r["condition"], "seed": r["seed"], "success": r["success"],
                      "blind_success": r.get("blind_success"),
                      "controls": {k: (control_result(r, k) or {}).get("success") for k in CONTROLS},
                      "wall_seconds": r.get("wall_seconds"), "train_steps_per_s": r["train"]["steps_per_s"],
                      "final_action_loss": r["train"]["final"].get("action_loss"),
                      "final_video_loss": r["train"]["final"].get("video_loss"),
                      "stage_seconds": r["stage_seconds"]} for r in results],
        "shared": {"demos": shared["demos"], "windows": shared["windows"], "vae": shared["vae"],
                   "vae_psnr_per_task": shared.get("vae_psnr_per_task"), "stage_seconds": stage_seconds},
        "stage_seconds_mean_per_run": {k: round(float(np.mean(v)), 2) for k, v in per_run.items()},
        # Stage time summed over the shared stages and every run (runs side by side overlap: not wall time).
        "stage_seconds_total": round(sum(stage_seconds.values()) + sum(sum(r["stage_seconds"].values())
                                                                       for r in results), 2),
        # Real wall time: each `lwam experiment` call from its start to its end (sessions.json), summed.
        "wall_seconds": round(sum(x["wall_seconds"] for x in sessions), 2) if sessions else None,
        "sessions": sessions,
        "config": cfg,
        "run_commits": sorted({r.get("commit") or "unknown" for r in results}),
        "runs_threads": cfg["demo"]["threads"],
        "cpu_count": os.cpu_count(),
        **environment(first.get("device", "cpu")),
    }


def markdown_table(report: dict[str, Any]) -> str:
    """Success per condition and task: mean ± sample std over seeds, each seed's value in brackets."""
    tasks = report["tasks"]
    short = [t.removesuffix("-v3") for t in tasks]
    lines = ["| condition | " + " | ".join(short) + " | mean over tasks |",
             "|---|" + "---|" * (len(tasks) + 1)]

    def cell(s):
        seeds = ", ".join(f"{100 * v:.0f}" for v in s["values"])
        spread = f" ± {100 * s['std']:.0f}" if s["n"] > 1 else ""
        return f"{100 * s['mean']:.0f}{spread} ({seeds})"

    for name, e in report["success"].items():
        lines.append(f"| {name} | " + " | ".join(cell(e["per_task"][t]) for t in tasks)
                     + f" | {cell(e['mean_over_tasks'])} |")
    return "\n".join(lines)


def _pts(x: float) -> str:
    return f"{100 * x + 0.0:+.1f}"  # + 0.0: no "-0.0"


def _ci(ti: dict[str, Any]) -> str:
    return "no interval (one seed)" if ti["ci"] is None else \
        f"95 % CI [{_pts(ti['ci'][0])}, {_pts(ti['ci'][1])}] (t, {ti['df']} df)"


def markdown_effects(report: dict[str, Any]) -> str:
    """The paired effects (per seed with a t interval, per task, per episode) and the control effects."""
    lines = []
    for k, v in report["paired_effects"].items():
        lines.append(f"- **{k}**, mean over tasks: {_pts(v['mean'])} points, {_ci(v['t_interval'])}; per seed: "
                     + ", ".join(_pts(x) for x in v["values"]) + f" (seeds {v['seeds']})")
        for t, e in v["per_task"].items():
            lines.append(f"  - {t.removesuffix('-v3')}: {_pts(e['mean'])}, {_ci(e['t_interval'])}")
        ep = v.get("episodes")
        if ep:
            a, b = k.split(" - ")
            lines.append(
                f"  - per episode ({ep['pairs']} pairs: same evaluation seed in both arms): both succeed {ep['both']}, "
                f"only {a} {ep['only_ref']}, only {b} {ep['only_other']}, neither {ep['neither']}; mean "
                f"difference {_pts(ep['mean_difference'])} points; McNemar exact p = {ep['mcnemar_p']:.3g}; "
                f"bootstrap 95 % CI over episode pairs [{_pts(ep['episode_bootstrap_ci'][0])}, "
                f"{_pts(ep['episode_bootstrap_ci'][1])}] (ignores seed clustering), hierarchical (seeds, then "
                f"episodes) [{_pts(ep['hierarchical_bootstrap_ci'][0])}, {_pts(ep['hierarchical_bootstrap_ci'][1])}]")
    if not lines:
        lines.append("- (one condition only)")
    if report.get("control_effects"):
        lines += ["", "Effect of each image control (own images minus the control's, same policy, per seed):", ""]
        for k, v in report["control_effects"].items():
            lines.append(f"- {k}: {_pts(v['mean'])} points, {_ci(v['t_interval'])}")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    commits = ", ".join(report["run_commits"]) or "unknown"
    shared_t = ", ".join(f"{k} {v:.0f} s" for k, v in report["shared"]["stage_seconds"].items())
    vae = report["shared"]["vae"]
    per_task = report["shared"].get("vae_psnr_per_task") or {}
    vae_line = (f"VAE ({vae.get('steps')} steps, shared by every run): reconstruction PSNR {vae.get('psnr', 0):.1f} dB "
                f"on training clips" + (" (first frames per task: " + ", ".join(
                    f"{k} {v:.1f}" for k, v in per_task.items()) + " dB; vae_reconstructions.png)" if per_task else "")
                + f". Demonstrations: {sum(report['shared']['demos'].get('episodes', {}).values())} episodes, "
                  f"{report['shared']['windows']} training windows.")
    run_t = ", ".join(f"{k} {v:.0f} s" for k, v in report["stage_seconds_mean_per_run"].items())
    sessions = report.get("sessions") or []
    if report.get("wall_seconds") is not None:
        wall = (f"Wall time: {report['wall_seconds']:.0f} s ({report['wall_seconds'] / 60:.1f} min) from start to end of "
                f"{len(sessions)} `lwam experiment` call(s) (" + "; ".join(
                    f"{x['started_utc']} to {x['ended_utc']}, {x['jobs']} job(s)" for x in sessions) + "); "
                f"stage time summed over all runs: {report['stage_seconds_total']:.0f} s.")
    else:
        wall = f"Stage time summed over all runs: {report['stage_seconds_total']:.0f} s (no wall-time record)."
    controls = "; ".join(f"{k}: {v}" for k, v in CONTROLS.items())
    return "\n".join([
        "# lwam experiment report", "",
        f"Tasks: {', '.join(report['tasks'])}. Cameras: {' + '.join(report['cameras'])} at {report['image_size']} px. "
        f"Seeds: {report['seeds']} ({report['runs']} runs). Success in % over {report['eval_episodes_per_task']} "
        f"unseen episodes per task and seed (each control: {report['blind_episodes_per_task']}); cells: mean ± sample "
        f"std over seeds (each seed's value).", "",
        markdown_table(report), "",
        f"Controls. {controls}.", "",
        "Paired effects (same seed = same initial weights, batches and evaluation episodes):", "",
        markdown_effects(report), "",
        vae_line, "",
        f"Shared stages: {shared_t}. Mean per run: {run_t}. {wall}", "",
        f"Machine: {report['device_name']}, {report['cpu_count']} logical CPUs, torch {report['torch']}, "
        f"{report['runs_threads']} intra-op thread(s) per run; runs at commit(s) {commits}. Per-run results "
        f"(every episode's outcome): runs/<condition>/seed_<s>/result.json.", "",
    ])


def plot_ablation(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Bars (mean over seeds) per task and condition with every seed's value as a point on its bar."""
    from lwam.plots import _plt

    plt = _plt()
    tasks = report["tasks"]
    names = list(report["success"])
    groups = [t.removesuffix("-v3") for t in tasks] + ["mean"]
    x = np.arange(len(groups))
    w = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 0.55 * len(groups) * len(names)), 3.8))
    rng = np.random.default_rng(0)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    base = [n for n in names if "+" not in n]
    for i, name in enumerate(names):
        e = report["success"][name]
        stats = [e["per_task"][t] for t in tasks] + [e["mean_over_tasks"]]
        xs = x - 0.4 + w * (i + 0.5)
        control = name.partition("+")[2]
        color = colors[base.index(name.partition("+")[0]) % len(colors)]  # a control shares its colour
        bars = ax.bar(xs, [100 * s["mean"] for s in stats], w * 0.92, label=name, color=color,
                      alpha=0.35 if control else 0.85, hatch={"": None, BLIND: "//", SHUFFLED: ".."}.get(control, "xx"),
                      edgecolor=color)
        ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
        for xi, s in zip(xs, stats):
            jitter = rng.uniform(-0.22, 0.22, len(s["values"])) * w
            ax.scatter(xi + jitter, [100 * v for v in s["values"]], s=10, color="black", zorder=3, linewidths=0)
    ax.set_xticks(x, groups, fontsize=8, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    ax.set_ylabel("success (%)")
    ax.set_ylim(0, 112)
    ax.axhline(80, color="gray", lw=0.7, ls="--")
    n = len(report["seeds"])
    ax.set_title(f"Closed-loop success on unseen episodes ({report['eval_episodes_per_task']} per task and seed)\n"
                 f"bars: mean over {n} seed{'s' if n > 1 else ''}; dots: each seed; hatched: controls (// blind, .. shuffled)",
                 fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def write_report(out: str | os.PathLike) -> dict[str, Any]:
    """Build the report of ``out`` and write report.json, report.md, ablation.png and stage_times.png."""
    from lwam.plots import plot_stage_times

    out = Path(out)
    report = build_report(out)
    # Figure paths relative to ``out``, so that the report stays valid wherever the directory is copied.
    report["figures"] = {"ablation": plot_ablation(report, out / "ablation.png").name,
                         "stage_times": (plot_stage_times(
                             {**{f"shared:{k}": v for k, v in report["shared"]["stage_seconds"].items()},
                              **{f"{k} (mean/run)": v for k, v in report["stage_seconds_mean_per_run"].items()}},
                             out / "stage_times.png", title="Wall time per stage")).name}
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown(report))
    return report
