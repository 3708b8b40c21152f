"""The demo's report: the table (every row's metrics with intervals over seeds and test utterances), the
paired comparisons with Holm's correction, the verdict, and the figures.

Pure functions of the SUPERB results (recipes/superb.py's results.json of every run); the statistics
are recipes/scores.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from s3prl_ekd.recipes.scores import bootstrap_interval, holm, mean_percent, paired_difference, percent

# (metric key, column label, higher is better) per reported column; pr_noisy: PR's model, noisy test audio.
TASK_METRICS = {"pr": ("per", "PER", False), "pr_noisy": ("per", "PER noisy", False),
                "sid": ("acc", "SID acc", True), "er": ("acc", "ER acc", True), "asr": ("wer", "WER", False)}
COLUMNS = ["pr", "pr_noisy", "sid", "er", "asr"]
TRAINED_TASKS = ("pr", "sid", "er", "asr")
BASELINE, TEACHER, SINGLE, COMBINATION = "baseline", "teacher", "single-teacher student", "combination"
ALPHA = 0.05  # family-wise error of all the paired verdicts of one report together
# Where each real teacher leads in SUPERB: RobustHuBERT on noisy speech, WavLM Base+ on speaker and emotion.
TEACHER_ROLES = (("robust_hubert", "pr_noisy"), ("wavlm", "sid"), ("wavlm", "er"))


@dataclass
class Row:
    """One upstream of the table and its SUPERB results, one per seed (run i: training and downstream seed i)."""

    name: str
    kind: str
    results: list[dict]
    params: int = 0
    description: str = ""


def task_scores(results: dict, task: str) -> dict:
    """Per-utterance test scores of `task` in one superb results.json (pr_noisy: PR's noisy test)."""
    if task == "pr_noisy":
        return results["runs"]["pr"]["runs"]["pr"]["noisy"]["scores"]
    (run,) = results["runs"][task]["runs"].values()  # the demo runs one ER fold
    return run["scores"]


def row_scores(row: Row, task: str) -> list[dict]:
    return [task_scores(results, task) for results in row.results]


def table(rows: list[Row], samples: int, seed: int) -> list[dict]:
    """Per row: the metric (mean over seeds), each seed's, and a 95% interval over seeds and utterances."""
    out = []
    for row in rows:
        metrics, per_seed, intervals, steps, rates = {}, {}, {}, {}, {}
        for task in COLUMNS:
            runs = row_scores(row, task)
            metrics[task] = round(mean_percent(runs), 2)
            per_seed[task] = [round(percent(scores), 2) for scores in runs]
            intervals[task] = [round(v, 2) for v in bootstrap_interval(runs, samples, seed)]
        for task in TRAINED_TASKS:
            steps[task] = [{"best": r["runs"][task]["best_step"][0], "ran": r["runs"][task]["steps"][0],
                            "cap": r["runs"][task]["max_steps"]} for r in row.results]
            rates[task] = [r["runs"][task]["lr"][0] for r in row.results]
        out.append({"name": row.name, "kind": row.kind, "description": row.description, "params": row.params,
                    "seeds": len(row.results), "metrics": metrics, "per_seed": per_seed, "interval95": intervals,
                    "downstream_steps": steps, "downstream_lr": rates})
    return out


def _better(task: str) -> int:
    return 1 if TASK_METRICS[task][2] else -1  # errors: lower is better


def compare(a: Row, b: Row, task: str, group: str, samples: int, seed: int) -> dict:
    """`a` against `b` on `task`: the advantage of `a` in points (positive = `a` is better, errors too)."""
    paired = paired_difference(row_scores(a, task), row_scores(b, task), samples, seed)
    sign = _better(task)
    low, high = sorted((sign * paired.low, sign * paired.high))
    return {"group": group, "a": a.name, "b": b.name, "task": task, "advantage": round(sign * paired.difference, 2),
            "interval95": [round(low, 2), round(high, 2)], "p": paired.p_value}


def comparisons(rows: list[Row], samples: int, seed: int) -> list[dict]:
    """Every paired comparison the report makes, then Holm's correction over all of them together:
    each combination against each single-teacher student on every column; where the teachers are rows,
    each teacher against fbank on content (PR, ASR) and the teachers against each other where the real
    ones differ (TEACHER_ROLES)."""
    by_name = {row.name: row for row in rows}
    singles = [r for r in rows if r.kind == SINGLE]
    pairs = [compare(c, s, task, "combination vs single-teacher student", samples, seed)
             for c in rows if c.kind == COMBINATION for s in singles for task in COLUMNS]
    teachers = [r for r in rows if r.kind == TEACHER]
    if "fbank" in by_name:
        pairs += [compare(t, by_name["fbank"], task, "teacher vs fbank", samples, seed)
                  for t in teachers for task in ("pr", "asr")]
    for kind, task in TEACHER_ROLES:
        leader = by_name.get(f"teacher_{kind}")
        if leader is not None:
            pairs += [compare(leader, other, task, "teacher vs teacher", samples, seed)
                      for other in teachers if other is not leader]
    for pair, rejected in zip(pairs, holm([p["p"] for p in pairs], ALPHA)):
        pair["verdict"] = ("better" if pair["advantage"] > 0 else "worse") if rejected else "not separable"
    return pairs


def mean_ranks(table_rows: list[dict], names: list[str]) -> dict[str, float]:
    """Each named row's rank (1 = best) per column among `names`, averaged over the five columns."""
    ranks = {name: 0.0 for name in names}
    for task in COLUMNS:
        values = {r["name"]: _better(task) * r["metrics"][task] for r in table_rows if r["name"] in names}
        for position, name in enumerate(sorted(values, key=values.get, reverse=True), 1):
            ranks[name] += position / len(COLUMNS)
    return {name: round(rank, 2) for name, rank in ranks.items()}


def best(table_rows: list[dict]) -> dict:
    """The best combination per column and overall (lowest mean rank among all students), and the best
    single-teacher student overall."""
    combos = [r["name"] for r in table_rows if r["kind"] == COMBINATION]
    singles = [r["name"] for r in table_rows if r["kind"] == SINGLE]
    if not combos or not singles:
        return {}
    ranks = mean_ranks(table_rows, combos + singles)
    per_task = {}
    for task in COLUMNS:
        values = {r["name"]: _better(task) * r["metrics"][task] for r in table_rows if r["name"] in combos}
        per_task[task] = max(values, key=values.get)
    return {"mean_rank": ranks, "combination_per_task": per_task,
            "combination": min(combos, key=ranks.get), "single": min(singles, key=ranks.get)}


def verdict(table_rows: list[dict], pairs: list[dict], top: dict) -> str:
    """The report's answer: the best combination against the best single-teacher student, task by task,
    counting only differences that survive Holm's correction."""
    if not top:
        return "The comparison needs at least one combination and one single-teacher student."
    combo, single = top["combination"], top["single"]
    mine = {p["task"]: p for p in pairs if p["a"] == combo and p["b"] == single}
    counts = {v: [TASK_METRICS[t][1] for t in COLUMNS if mine[t]["verdict"] == v]
              for v in ("better", "worse", "not separable")}
    seeds = table_rows[0]["seeds"]
    lines = [f"Best combination by mean rank over the five columns: {combo} ({top['mean_rank'][combo]}); best "
             f"single-teacher student: {single} ({top['mean_rank'][single]}).",
             f"{combo} against {single}: better on {', '.join(counts['better']) or 'no task'}, worse on "
             f"{', '.join(counts['worse']) or 'no task'}, not separable on "
             f"{', '.join(counts['not separable']) or 'no task'} ({seeds} seed(s) each; paired bootstrap over seeds "
             f"and test utterances, Holm-corrected over all {len(pairs)} comparisons of this report, "
             f"{100 * (1 - ALPHA):g}% family-wise).",
             "Per column, the best combination: " + ", ".join(f"{TASK_METRICS[t][1]} {top['combination_per_task'][t]}"
                                                              for t in COLUMNS) + "."]
    if counts["better"] and not counts["worse"]:
        lines.append(f"{combo} beats the best single-teacher student beyond noise on "
                     f"{len(counts['better'])} of {len(COLUMNS)} columns and loses on none.")
    elif counts["worse"] and not counts["better"]:
        lines.append(f"No combination is shown better: {combo} is worse than {single} beyond noise on "
                     f"{len(counts['worse'])} column(s).")
    else:
        lines.append(f"{combo} is not shown better than the best single-teacher student overall.")
    return "\n".join(f"- {line}" for line in lines)


def markdown(report: dict) -> str:
    config, rows = report["config"], report["rows"]
    seeds = rows[0]["seeds"] if rows else 1
    head = "| upstream | kind | params | " + " | ".join(
        TASK_METRICS[t][1] + (" ↑" if TASK_METRICS[t][2] else " ↓") for t in COLUMNS) + " |"
    lines = [f"# EKD demo ({report['title']})", "", report["setting"], "", head, "|" + "---|" * (len(COLUMNS) + 3)]
    for row in rows:
        cells = [f"{row['metrics'][t]:.1f} [{row['interval95'][t][0]:.1f}, {row['interval95'][t][1]:.1f}]"
                 for t in COLUMNS]
        lines.append(f"| {row['name']} | {row['kind']} | {row['params'] / 1e6:.2f}M | " + " | ".join(cells) + " |")
    lines += ["", f"Test split, % (mean over {seeds} seed(s)) with 95% bootstrap intervals over "
              f"{'seeds and ' if seeds > 1 else ''}the {report['test_utterances']} test utterances "
              f"({config['bootstrap']} resamples). PER noisy: the PR model on the test audio with white noise at "
              f"{config['noisy_snr_db']:g} dB SNR.", ""]
    described = [r for r in rows if r["description"]]
    if described:
        lines += ["Rows:", ""] + [f"- {r['name']}: {r['description']}" for r in described] + [""]
    if report.get("reused"):
        lines += ["Students trained with identical inputs for another --out folder, reused with their SUPERB "
                  "results: " + ", ".join(f"`{path}`" for path in report["reused"]) + ".", ""]
    lines += ["## Verdict", "", report["verdict"], ""]
    if report["best"]:
        lines += ["Mean rank over the five columns (1 = best), among the students: " + ", ".join(
            f"{name} {rank}" for name, rank in sorted(report["best"]["mean_rank"].items(), key=lambda x: x[1])), ""]
    lines += [f"## Paired comparisons ({len(report['comparisons'])}, Holm-corrected together)", "",
              "Advantage of the first upstream in points (positive = better, errors too), its 95% interval (not "
              "corrected), the bootstrap p-value, and the verdict after Holm's correction.", "",
              "| upstream | vs | task | advantage | 95% interval | p | verdict |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['a']} | {p['b']} | {TASK_METRICS[p['task']][1]} | {p['advantage']:+.2f} | "
              f"[{p['interval95'][0]:+.2f}, {p['interval95'][1]:+.2f}] | {p['p']:.4f} | {p['verdict']} |"
              for p in report["comparisons"]]
    lines += ["", "## Downstream training", "", "Per task: the step of the best dev metric / steps run / the recipe's "
              "cap, @ the learning rate chosen on dev (seed by seed).", "",
              "| upstream | " + " | ".join(TRAINED_TASKS) + " |", "|---|" + "---|" * len(TRAINED_TASKS)]
    for row in rows:
        lines.append(f"| {row['name']} | " + " | ".join(
            "; ".join("{best} / {ran} / {cap}".format(**s) + f" @ {lr:g}"
                      for s, lr in zip(row["downstream_steps"][t], row["downstream_lr"][t])) for t in TRAINED_TASKS)
            + " |")
    runs = [s for row in rows for t in TRAINED_TASKS for s in row["downstream_steps"][t]]
    lines += ["", f"{sum(s['ran'] < s['cap'] for s in runs)} of {len(runs)} runs stopped early; "
              f"{sum(s['best'] == s['cap'] for s in runs)} had their best dev metric at the cap's step."]
    lines += ["", "## Stage times of the run that wrote this report (s)", "",
              "A stage whose outputs were already on disk is answered from there and shows its reading time.", ""]
    lines += [f"- {k}: {v:.0f}" for k, v in report["stage_seconds"].items()]
    lines += ["", "Figures: `metrics.png` (every upstream per task, with intervals), `loss_curves.png`. Exact "
              "commands: each run's `superb/<name>/results.json`."]
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path, curves: dict[str, list[tuple[int, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in curves.items():
        ax = axes[0] if name.startswith("teacher") else axes[1]
        ax.plot([s for s, _ in points], [v for _, v in points], label=name)
    axes[0].set_title("teachers: masked-prediction loss")
    axes[1].set_title("students: distillation loss")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)
    plt.close(fig)

    rows = report["rows"]
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(3.2 * len(COLUMNS), 4.2))
    colors = {BASELINE: "tab:gray", TEACHER: "tab:green", SINGLE: "tab:blue", COMBINATION: "tab:red"}
    for ax, task in zip(axes, COLUMNS):
        values = [r["metrics"][task] for r in rows]
        low = [max(0.0, v - r["interval95"][task][0]) for v, r in zip(values, rows)]
        high = [max(0.0, r["interval95"][task][1] - v) for v, r in zip(values, rows)]
        ax.bar(range(len(rows)), values, yerr=[low, high], capsize=2, color=[colors[r["kind"]] for r in rows])
        ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=70, ha="right", fontsize=6)
        ax.set_title(f"{TASK_METRICS[task][1]} (%, 95% CI)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=100)
    plt.close(fig)
