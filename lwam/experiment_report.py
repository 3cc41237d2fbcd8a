"""The report of an ``lwam experiment``: per condition and task, closed-loop success over seeds (mean, spread,
every seed's value), the blind-vision control, the paired effect of each condition against the first one, wall
time per stage; written as ``report.json``, ``report.md`` and two figures.

Reads only what the runs wrote (``runs/<condition>/seed_<s>/result.json``, ``shared/shared.json``,
``experiment.json``), so it can be rebuilt at any time: ``lwam experiment --report-only --out DIR``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lwam._atomic import atomic_write_json, atomic_write_text
from lwam._env import environment

BLIND = "blind"


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
    from lwam.experiment import CONDITIONS

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
        blind = [r for r in rs if r.get("blind_success") is not None]
        if blind:
            table[f"{c}+{BLIND}"] = {
                "label": f"blind control of '{c}' (every image zeroed at evaluation)",
                "seeds": [r["seed"] for r in blind],
                "per_task": {t: summarize([r["blind_success"][t] for r in blind]) for t in tasks},
                "mean_over_tasks": summarize([r["blind_success_rate"] for r in blind])}

    # Paired effect against the first condition: seed s of every condition shares its initial weights and data
    # order, so the per-seed difference isolates what the condition changes.
    effects: dict[str, Any] = {}
    ref = conditions[0]
    by = {(r["condition"], r["seed"]): r for r in results}
    for c in conditions[1:]:
        seeds = [s for (cc, s) in by if cc == c and (ref, s) in by]
        if seeds:
            diffs = [by[(ref, s)]["success_rate"] - by[(c, s)]["success_rate"] for s in sorted(seeds)]
            effects[f"{ref} - {c}"] = {"seeds": sorted(seeds), **summarize(diffs)}

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
        "eval_episodes_per_task": cfg["demo"]["eval_episodes"],
        "blind_episodes_per_task": cfg.get("blind_episodes") or cfg["demo"]["eval_episodes"],
        "eval_seed_start": first["eval_seed_start"],
        "per_seed": [{"condition": r["condition"], "seed": r["seed"], "success": r["success"],
                      "blind_success": r.get("blind_success"), "train_steps_per_s": r["train"]["steps_per_s"],
                      "final_action_loss": r["train"]["final"].get("action_loss"),
                      "final_video_loss": r["train"]["final"].get("video_loss"),
                      "stage_seconds": r["stage_seconds"]} for r in results],
        "shared": {"demos": shared["demos"], "windows": shared["windows"], "vae": shared["vae"],
                   "vae_psnr_per_task": shared.get("vae_psnr_per_task"), "stage_seconds": stage_seconds},
        "stage_seconds_mean_per_run": {k: round(float(np.mean(v)), 2) for k, v in per_run.items()},
        "wall_seconds_total": round(sum(stage_seconds.values()) + sum(sum(r["stage_seconds"].values())
                                                                      for r in results), 2),
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


def markdown(report: dict[str, Any]) -> str:
    commits = ", ".join(report["run_commits"]) or "unknown"
    eff = "\n".join(f"- {k}: {100 * v['mean']:+.1f} points (per seed: "
                    + ", ".join(f"{100 * x:+.0f}" for x in v["values"]) + ")"
                    for k, v in report["paired_effects"].items()) or "- (one condition only)"
    shared_t = ", ".join(f"{k} {v:.0f} s" for k, v in report["shared"]["stage_seconds"].items())
    vae = report["shared"]["vae"]
    per_task = report["shared"].get("vae_psnr_per_task") or {}
    vae_line = (f"VAE ({vae.get('steps')} steps, shared by every run): reconstruction PSNR {vae.get('psnr', 0):.1f} dB "
                f"on training clips" + (" (first frames per task: " + ", ".join(
                    f"{k} {v:.1f}" for k, v in per_task.items()) + " dB; vae_reconstructions.png)" if per_task else "")
                + f". Demonstrations: {sum(report['shared']['demos'].get('episodes', {}).values())} episodes, "
                  f"{report['shared']['windows']} training windows.")
    run_t = ", ".join(f"{k} {v:.0f} s" for k, v in report["stage_seconds_mean_per_run"].items())
    return "\n".join([
        "# lwam experiment report", "",
        f"Tasks: {', '.join(report['tasks'])}. Seeds: {report['seeds']} ({report['runs']} runs). "
        f"Success in % over {report['eval_episodes_per_task']} unseen episodes per task and seed "
        f"(blind control: {report['blind_episodes_per_task']}); cells: mean ± sample std over seeds "
        f"(each seed's value).", "",
        markdown_table(report), "",
        "Paired effect on the mean over tasks (same seed = same initial weights and data order):", "", eff, "",
        vae_line, "",
        f"Shared stages: {shared_t}. Mean per run: {run_t}. Total: {report['wall_seconds_total']:.0f} s of stage "
        f"time.", "",
        f"Machine: {report['device_name']}, {report['cpu_count']} logical CPUs, torch {report['torch']}, "
        f"{report['runs_threads']} intra-op thread(s) per run; runs at commit(s) {commits}.", "",
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
    base = [n for n in names if not n.endswith(f"+{BLIND}")]
    for i, name in enumerate(names):
        e = report["success"][name]
        stats = [e["per_task"][t] for t in tasks] + [e["mean_over_tasks"]]
        xs = x - 0.4 + w * (i + 0.5)
        blind = name.endswith(f"+{BLIND}")
        color = colors[base.index(name.removesuffix(f"+{BLIND}")) % len(colors)]  # a control shares its colour
        bars = ax.bar(xs, [100 * s["mean"] for s in stats], w * 0.92, label=name, color=color,
                      alpha=0.35 if blind else 0.85, hatch="//" if blind else None, edgecolor=color)
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
                 f"bars: mean over {n} seed{'s' if n > 1 else ''}; dots: each seed; hatched: blind control",
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
