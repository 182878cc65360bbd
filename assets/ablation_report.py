"""ablation_report: which variant won each metric, by how much, and whether that is more than noise.

Numbers per run (variant x seed), read from the runs' own outputs — the same Parquet files behind
the `train_metrics` and `evals` tables, so the report agrees with `foundry sql`:

    train/final_loss        loss at the last logged step (train_metrics: arg_max(loss, step))
    train/max_attn_logit    runs with QK-clip: the largest attention logit seen (max(max_attn_logit))
    <task>/<metric>         every row of evals.parquet (cloze, mc and held-out: wikitext2/bits_per_byte)
    moe/expert_source_mi    MoE only: mutual information between expert and source, bits, averaged
                            over MoE layers, from the expert load of the second half of training
    moe/load_cv             MoE only: coefficient of variation of tokens per expert (0 = balanced)

Per variant and metric: the mean over seeds and its standard error from two sources, combined as
SE = sqrt(SE_seeds^2 + SE_items^2): SE_seeds = sd over seeds / sqrt(seeds); SE_items = the eval
harness's per-run item standard error, sqrt(sum of squares) / seeds (the items are the same in
every run, so they are a noise source the seeds do not sample). Two variants differ beyond noise
when |a - b| >= 2 * sqrt(SE_a^2 + SE_b^2).
"""

from __future__ import annotations

import base64
import io
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

TRAIN_LOSS = "train/final_loss"
NOISE_SIGMAS = 2.0
ABLATIONS_SCHEMA = pa.schema([("grid", pa.string()), ("variant", pa.string()), ("seed", pa.int64()),
                              ("metric", pa.string()), ("value", pa.float64())])


def metric_direction(metric: str) -> str | None:
    """'lower' or 'higher' is better, or None for a descriptive number (no winner is named)."""
    last = metric.rsplit("/", 1)[-1]
    if last in ("loss", "final_loss", "bits_per_byte"):
        return "lower"
    if last.startswith("acc"):
        return "higher"
    return None


# --- numbers per run -----------------------------------------------------------------------


@dataclass(frozen=True)
class RunOutputs:
    """Where one run's outputs are: its checkpoint folder and its eval report folder."""

    variant: str
    seed: int
    points: dict[str, str]
    checkpoint: Path
    eval_report: Path
    data_version: str | None = None  # of the mixture it trained on: runs with different ones saw different text


@dataclass(frozen=True)
class Measurement:
    variant: str
    seed: int
    metric: str
    value: float
    item_se: float | None = None  # the eval harness's standard error over items, where it gives one


def final_loss(metrics: Path) -> float:
    rows = pq.read_table(metrics, columns=["step", "loss"]).to_pylist()
    if not rows:
        raise ValueError(f"{metrics}: no training steps logged")
    return float(max(rows, key=lambda r: r["step"])["loss"])


def loss_curve(metrics: Path) -> list[tuple[int, float]]:
    return sorted((int(r["step"]), float(r["loss"])) for r in pq.read_table(metrics, columns=["step", "loss"]).to_pylist())


def expert_load_late(expert_load: Path) -> dict[int, dict[str, dict[int, int]]]:
    """layer -> source -> expert -> tokens, over the logging windows of the second half of training."""
    rows = pq.read_table(expert_load, columns=["step", "layer", "expert", "source", "tokens"]).to_pylist()
    if not rows:
        return {}
    half = max(r["step"] for r in rows) / 2
    load: dict[int, dict[str, dict[int, int]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    for r in rows:
        if r["step"] > half:
            load[r["layer"]][r["source"]][r["expert"]] += r["tokens"]
    return load


def source_expert_mi(counts: dict[str, dict[int, int]]) -> float:
    """Mutual information (bits) between the source of a token and the expert it was routed to."""
    total = sum(n for by_expert in counts.values() for n in by_expert.values())
    if total == 0:
        return 0.0
    per_source = {s: sum(by_expert.values()) for s, by_expert in counts.items()}
    per_expert: dict[int, int] = defaultdict(int)
    for by_expert in counts.values():
        for e, n in by_expert.items():
            per_expert[e] += n
    mi = 0.0
    for s, by_expert in counts.items():
        for e, n in by_expert.items():
            if n:
                mi += n / total * math.log2(n * total / (per_source[s] * per_expert[e]))
    return mi


def load_cv(counts: dict[str, dict[int, int]]) -> float:
    per_expert: dict[int, int] = defaultdict(int)
    for by_expert in counts.values():
        for e, n in by_expert.items():
            per_expert[e] += n
    loads = list(per_expert.values())
    mean = sum(loads) / len(loads) if loads else 0.0
    return statistics.pstdev(loads) / mean if mean else 0.0


def measure(run: RunOutputs) -> list[Measurement]:
    """Every number the report compares, for one run."""
    metrics = run.checkpoint / "metrics.parquet"
    out = [Measurement(run.variant, run.seed, TRAIN_LOSS, final_loss(metrics))]
    if "max_attn_logit" in pq.read_schema(metrics).names:  # tracked with QK-clip: did the clip ever fire?
        logits = [x for x in pq.read_table(metrics, columns=["max_attn_logit"]).column(0).to_pylist() if x is not None]
        if logits:
            out.append(Measurement(run.variant, run.seed, "train/max_attn_logit", float(max(logits))))
    evals = run.eval_report / "evals.parquet"
    if not evals.is_file():
        raise FileNotFoundError(f"{evals}: the eval report has no evals.parquet")
    for r in pq.read_table(evals).to_pylist():
        se = r.get("stderr")
        out.append(Measurement(run.variant, run.seed, f"{r['task']}/{r['metric']}", float(r["value"]),
                               None if se is None or math.isnan(se) else float(se)))
    load_file = run.checkpoint / "expert_load.parquet"
    if load_file.is_file():
        layers = expert_load_late(load_file)
        if layers:
            out.append(Measurement(run.variant, run.seed, "moe/expert_source_mi",
                                   statistics.fmean(source_expert_mi(c) for c in layers.values())))
            out.append(Measurement(run.variant, run.seed, "moe/load_cv",
                                   statistics.fmean(load_cv(c) for c in layers.values())))
    return out


# --- statistics ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    se_seeds: float | None  # None with one seed
    se_items: float | None  # None where the harness gives no item error (losses)

    @property
    def se(self) -> float | None:
        parts = [p for p in (self.se_seeds, self.se_items) if p is not None]
        return math.sqrt(sum(p * p for p in parts)) if parts else None


def summarize(values: list[float], item_ses: list[float | None]) -> Summary:
    n = len(values)
    se_seeds = statistics.stdev(values) / math.sqrt(n) if n > 1 else None
    se_items = (math.sqrt(sum(s * s for s in item_ses)) / n
                if item_ses and all(s is not None for s in item_ses) else None)
    return Summary(n, statistics.fmean(values), se_seeds, se_items)


@dataclass(frozen=True)
class Versus:
    """The best entity against one other on one metric."""

    entity: str
    diff: float  # best minus this entity
    se_diff: float | None  # None: no noise estimate for this pair
    beyond_noise: bool | None  # None: no noise estimate


@dataclass(frozen=True)
class Comparison:
    metric: str
    direction: str | None
    ranked: list[str]  # entities, best first (for descriptive metrics: largest first)
    diff: float | None = None  # winner minus runner-up
    se_diff: float | None = None
    # winner: the best beats every other beyond noise; leads: it beats some, the rest are within noise
    # of it; within_noise: it beats none; no_noise_estimate; not_comparable (measured on different
    # data); descriptive (no better direction); single (one entity)
    verdict: str = "single"
    versus: tuple[Versus, ...] = ()  # the best against every other entity, in rank order
    note: str = ""

    @property
    def winner(self) -> str | None:
        return self.ranked[0] if self.verdict == "winner" else None

    @property
    def leaders(self) -> list[str]:
        """The best and every entity within noise of it (one name when there is a winner)."""
        if self.verdict not in ("winner", "leads", "within_noise"):
            return []
        return [self.ranked[0]] + [v.entity for v in self.versus if not v.beyond_noise]

    @property
    def beaten(self) -> list[str]:
        """Entities the best beats beyond noise."""
        return [v.entity for v in self.versus if v.beyond_noise]


def compare(metric: str, summaries: dict[str, Summary]) -> Comparison:
    """Rank entities on one metric and test the best against every other one.

    Testing only the runner-up would hide a real difference whenever two entities tie at the top
    (a QK-clip that never fires makes its variant plain Muon: tied with Muon, both ahead of AdamW).
    """
    direction = metric_direction(metric)
    sign = 1 if direction == "lower" else -1
    ranked = sorted(summaries, key=lambda e: (sign * summaries[e].mean, e))
    if direction is None:
        return Comparison(metric, None, ranked, verdict="descriptive")
    if len(ranked) < 2:
        return Comparison(metric, direction, ranked)
    best = summaries[ranked[0]]
    versus = []
    for other in ranked[1:]:
        ses = [best.se, summaries[other].se]
        se_diff = math.sqrt(sum(s * s for s in ses)) if all(s is not None for s in ses) else None
        diff = best.mean - summaries[other].mean
        beyond = None if not se_diff else abs(diff) >= NOISE_SIGMAS * se_diff
        versus.append(Versus(other, diff, se_diff or None, beyond))
    runner_up = versus[0]
    if any(v.beyond_noise is None for v in versus):
        return Comparison(metric, direction, ranked, runner_up.diff, None, "no_noise_estimate", tuple(versus))
    beaten = sum(bool(v.beyond_noise) for v in versus)
    verdict = "winner" if beaten == len(versus) else "leads" if beaten else "within_noise"
    return Comparison(metric, direction, ranked, runner_up.diff, runner_up.se_diff, verdict, tuple(versus))


def not_comparable(c: Comparison, note: str) -> Comparison:
    """The same ranking, with no verdict: the entities were measured on different things."""
    return Comparison(c.metric, c.direction, c.ranked, verdict="not_comparable", note=note)


def statement(c: Comparison, summaries: dict[str, Summary]) -> str:
    """One plain sentence per metric."""
    mean = {e: _fmt(summaries[e].mean) for e in c.ranked}
    if c.verdict == "descriptive":
        return f"**{c.metric}** (descriptive, no better direction): " + ", ".join(
            f"`{e}` {mean[e]}" for e in c.ranked) + "."
    if c.verdict == "single":
        return f"**{c.metric}**: only `{c.ranked[0]}` has it ({mean[c.ranked[0]]})."
    if c.verdict == "not_comparable":
        return (f"**{c.metric}**: " + ", ".join(f"`{e}` {mean[e]}" for e in c.ranked)
                + f"; no verdict: {c.note}")
    best = c.ranked[0]
    head = f"**{c.metric}** ({c.direction} is better): `{best}` {mean[best]}"
    if c.verdict == "no_noise_estimate":
        second = c.ranked[1]
        return (f"{head} vs `{second}` {mean[second]}, a difference of {_fmt(abs(c.diff))}; one seed and no "
                "per-item error give no noise estimate: no winner can be named.")

    def against(vs: list[Versus]) -> str:
        return ", ".join(f"`{v.entity}` {mean[v.entity]} by {_fmt(abs(v.diff))} (SE {_fmt(v.se_diff)})" for v in vs)

    beaten = [v for v in c.versus if v.beyond_noise]
    tied = [v for v in c.versus if not v.beyond_noise]
    if c.verdict == "winner":
        every = "the only other" if len(beaten) == 1 else "every other"
        return (f"{head} beats {every} beyond {NOISE_SIGMAS:g} × the standard error of the difference: "
                f"{against(beaten)}. `{best}` wins.")
    if c.verdict == "within_noise":
        return (f"{head} vs {against(tied)}: within noise (less than {NOISE_SIGMAS:g} × the standard error "
                "of the difference): no winner at this scale.")
    leaders = " and ".join(f"`{e}`" for e in c.leaders)
    return (f"{head} beats {against(beaten)} beyond {NOISE_SIGMAS:g} × the standard error of the difference, "
            f"but {against(tied)} {'is' if len(tied) == 1 else 'are'} within noise of it: {leaders} lead, "
            "no single winner.")


# --- the report ------------------------------------------------------------------------------


@dataclass
class Report:
    grid: str
    measurements: list[Measurement]
    entities: dict[str, str]  # what is compared (a variant, or a best_of group) -> the variant standing for it
    summaries: dict[str, dict[str, Summary]]  # metric -> variant -> summary
    comparisons: dict[str, Comparison]
    best_of: dict[str, Any] | None = None  # axis, by, and per group the point chosen and every point's mean
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # variant -> mean loss by step
    expert_shares: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)  # variant -> source -> expert

    def rows(self) -> list[dict[str, Any]]:
        """The `ablations` table: one row per run and metric."""
        return [{"grid": self.grid, "variant": m.variant, "seed": m.seed, "metric": m.metric, "value": m.value}
                for m in self.measurements]

    def as_json(self) -> dict[str, Any]:
        def summary(s: Summary) -> dict[str, Any]:
            return {"n": s.n, "mean": s.mean, "se": s.se, "se_seeds": s.se_seeds, "se_items": s.se_items}

        return {
            "grid": self.grid,
            "entities": self.entities,
            "best_of": self.best_of,
            "metrics": {
                metric: {"direction": c.direction, "ranked": c.ranked, "winner": c.winner, "verdict": c.verdict,
                         "leaders": c.leaders, "beaten": c.beaten, "diff": c.diff, "se_diff": c.se_diff,
                         "versus": {v.entity: {"diff": v.diff, "se_diff": v.se_diff, "beyond_noise": v.beyond_noise}
                                    for v in c.versus},
                         "note": c.note,
                         "variants": {v: summary(s) for v, s in self.summaries[metric].items()}}
                for metric, c in self.comparisons.items()
            },
        }


def _metric_order(metrics: set[str]) -> list[str]:
    """Training loss, held-out numbers, tasks, then descriptive ones; alphabetical inside each."""
    def rank(m: str) -> tuple:
        d = metric_direction(m)
        return (m != TRAIN_LOSS, d is None, not m.endswith(("/loss", "/bits_per_byte")), m)

    return sorted(metrics, key=rank)


def _default_by(metrics: set[str]) -> str:
    """Bits per byte on the held-out text set (same text for every variant), else on a source's
    held-out split, else the final training loss."""
    bpb = sorted(m for m in metrics if m.endswith("/bits_per_byte"))
    return min(bpb, key=lambda m: (m.startswith("heldout:"), m)) if bpb else TRAIN_LOSS


def _pick_best(grid_runs: list[RunOutputs], axis: str, by: str | None,
               summaries: dict[str, dict[str, Summary]]) -> tuple[dict[str, str], dict[str, Any]]:
    """Each group of variants that differ only on `axis` is represented by its best point on `by`."""
    by = by or _default_by(set(summaries))
    if by not in summaries:
        raise ValueError(f"best_of.by: no metric '{by}' in these runs; they have {_metric_order(set(summaries))}")
    direction = metric_direction(by)
    if direction is None:
        raise ValueError(f"best_of.by: '{by}' has no better direction (lower or higher) to pick by")
    groups: dict[str, dict[str, str]] = {}  # group -> point -> variant
    for run in grid_runs:
        others = [p for a, p in run.points.items() if a != axis]
        groups.setdefault("_".join(others), {})[run.points[axis]] = run.variant
    sign = 1 if direction == "lower" else -1
    entities, chosen = {}, {}
    for group, points in groups.items():
        scored = {point: summaries[by][variant].mean for point, variant in points.items() if variant in summaries[by]}
        if not scored:
            raise ValueError(f"best_of.by: no run of group '{group}' has '{by}'")
        best = min(scored, key=lambda p: (sign * scored[p], p))
        entities[group] = points[best]
        chosen[group] = {"point": best, "variant": points[best], "scores": scored}
    points = list(dict.fromkeys(run.points[axis] for run in grid_runs))  # in the ablation file's order
    return entities, {"axis": axis, "by": by, "direction": direction, "points": points, "groups": chosen}


def make_report(grid: str, runs: list[RunOutputs], best_of: dict[str, Any] | None = None) -> Report:
    measurements = [m for run in runs for m in measure(run)]
    values: dict[str, dict[str, list[Measurement]]] = defaultdict(lambda: defaultdict(list))
    for m in measurements:
        values[m.metric][m.variant].append(m)
    summaries = {metric: {v: summarize([m.value for m in ms], [m.item_se for m in ms]) for v, ms in by_v.items()}
                 for metric, by_v in values.items()}
    picked = None
    if best_of:
        entities, picked = _pick_best(runs, best_of["axis"], best_of.get("by"), summaries)
    else:
        entities = {v: v for v in dict.fromkeys(r.variant for r in runs)}
    comparisons = {}
    for metric in _metric_order(set(summaries)):
        present = {e: summaries[metric][v] for e, v in entities.items() if v in summaries[metric]}
        comparisons[metric] = compare(metric, present)
    mixtures = {r.data_version for r in runs if r.variant in entities.values()}
    if TRAIN_LOSS in comparisons and len(mixtures - {None}) > 1:
        # each variant's loss is on its own training text: a harder mix scores worse and learns no less
        comparisons[TRAIN_LOSS] = not_comparable(
            comparisons[TRAIN_LOSS], "the variants train on different mixtures, so each loss is measured on "
            "different text; compare them on held-out bits per byte and the eval tasks.")
    report = Report(grid, measurements, entities, summaries, comparisons, picked)
    report.curves = _mean_curves(runs)
    report.expert_shares = _expert_shares(runs)
    return report


def _mean_curves(runs: list[RunOutputs]) -> dict[str, list[tuple[int, float]]]:
    by_variant: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for step, loss in loss_curve(run.checkpoint / "metrics.parquet"):
            by_variant[run.variant][step].append(loss)
    return {v: [(s, statistics.fmean(ls)) for s, ls in sorted(steps.items())] for v, steps in by_variant.items()}


def _expert_shares(runs: list[RunOutputs]) -> dict[str, dict[str, dict[int, float]]]:
    """variant -> source -> expert -> share of the source's routed tokens (all MoE layers and seeds)."""
    totals: dict[str, dict[str, dict[int, int]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    for run in runs:
        path = run.checkpoint / "expert_load.parquet"
        if not path.is_file():
            continue
        for counts in expert_load_late(path).values():
            for source, by_expert in counts.items():
                for e, n in by_expert.items():
                    totals[run.variant][source][e] += n
    shares = {}
    for variant, by_source in totals.items():
        shares[variant] = {}
        for source, by_expert in sorted(by_source.items()):
            total = sum(by_expert.values()) or 1
            shares[variant][source] = {e: n / total for e, n in sorted(by_expert.items())}
    return shares


# --- rendering ---------------------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    if x != 0 and abs(x) < 1e-3:
        return f"{x:.2e}"
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.3f}"


def _cell(s: Summary | None) -> str:
    if s is None:
        return ""
    return _fmt(s.mean) + (f" ± {_fmt(s.se)}" if s.se is not None else "")


def markdown(report: Report, runs: list[RunOutputs], description: str = "", image: str = "loss_curves.png") -> str:
    variants = list(dict.fromkeys(r.variant for r in runs))
    seeds = sorted({r.seed for r in runs})
    axes = list(runs[0].points) if runs else []
    lines = [f"# Ablation `{report.grid}`", ""]
    if description:
        lines += [description.strip(), ""]
    lines += [
        f"{len(variants)} variants × {len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}) "
        f"= {len(runs)} runs; axes: {' × '.join(axes)}.",
        "",
        f"Cells: mean over seeds ± standard error, SE = √(SE_seeds² + SE_items²). A difference is beyond noise "
        f"when |a − b| ≥ {NOISE_SIGMAS:g}·√(SE_a² + SE_b²).",
        "",
    ]
    if report.best_of:
        b = report.best_of
        points = b["points"]
        lines += [f"## Best `{b['axis']}` per group (picked by {b['by']}, {b['direction']} is better)", "",
                  f"| group | best {b['axis']} | " + " | ".join(points) + " |", "|---|---|" + "---:|" * len(points)]
        for group, g in b["groups"].items():
            lines.append(f"| {group} | {g['point']} | " + " | ".join(
                (f"**{_fmt(g['scores'][p])}**" if p == g["point"] else _fmt(g["scores"].get(p))) for p in points) + " |")
        lines += ["", f"Each group is compared below at its best {b['axis']}. Picking the best of "
                  f"{len(points)} on the same numbers flatters every group a little.", ""]
    entities = list(report.entities)
    lines += ["## Results", "", "| metric | better | " + " | ".join(
        f"{e}" + (f" ({report.entities[e]})" if report.entities[e] != e else "") for e in entities) + " | winner |",
        "|---|---|" + "---:|" * len(entities) + "---|"]
    for metric, c in report.comparisons.items():
        cells = [_cell(report.summaries[metric].get(report.entities[e])) for e in entities]
        verdict = {"winner": f"**{c.ranked[0]}**" if c.ranked else "",
                   "leads": " ≈ ".join(f"**{e}**" for e in c.leaders) + " (tied)",
                   "within_noise": "within noise", "no_noise_estimate": "no noise estimate",
                   "not_comparable": "not comparable", "descriptive": "", "single": ""}[c.verdict]
        lines.append(f"| {metric} | {c.direction or ''} | " + " | ".join(cells) + f" | {verdict} |")
    lines += ["", "## What won", ""]
    lines += [f"- {statement(c, {e: report.summaries[c.metric][report.entities[e]] for e in c.ranked})}"
              for c in report.comparisons.values() if c.verdict != "descriptive"]
    tests = sum(len(c.versus) for c in report.comparisons.values() if c.verdict in ("winner", "leads", "within_noise"))
    if tests > 1:
        chance = 2 * (1 - statistics.NormalDist().cdf(NOISE_SIGMAS))  # two-sided, per pair
        lines += ["", f"These are {tests} pairwise tests at {NOISE_SIGMAS:g} standard errors: even if no variant "
                  f"differed, about {tests * chance:.1f} of them would land beyond noise by chance ({chance:.1%} "
                  "each), so a lone win among many metrics is weak evidence; a win on several related "
                  "metrics, or again with more seeds, is not."]
    lines += ["", "## Training loss", "", f"![loss curves]({image})", ""]
    if (loss := report.comparisons.get(TRAIN_LOSS)) is not None and loss.verdict == "not_comparable":
        lines += [f"The curves are not comparable across variants: {loss.note}", ""]
    if report.expert_shares:
        lines += ["## Expert load by source (second half of training, all MoE layers and seeds)", ""]
        for variant, by_source in report.expert_shares.items():
            experts = sorted({e for shares in by_source.values() for e in shares})
            lines += [f"**{variant}**", "", "| source | " + " | ".join(f"e{e}" for e in experts) + " |",
                      "|---|" + "---:|" * len(experts)]
            lines += [f"| {s} | " + " | ".join(f"{shares.get(e, 0.0):.3f}" for e in experts) + " |"
                      for s, shares in by_source.items()]
            lines.append("")
    lines += ["Every number per run: `foundry sql \"select * from ablations where grid = "
              f"'{report.grid}' order by metric, variant, seed\"`.", ""]
    return "\n".join(lines)


def loss_curves_png(report: Report) -> bytes:
    """Mean training loss over seeds against step, one line per variant (compared ones solid)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 4.0), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    compared = set(report.entities.values())
    for variant, curve in report.curves.items():
        steps, losses = zip(*curve, strict=True) if curve else ((), ())
        main = variant in compared
        ax.plot(steps, losses, label=variant if main or len(report.curves) <= 10 else None,
                linewidth=1.8 if main else 0.8, alpha=1.0 if main else 0.45, linestyle="-" if main else "--")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_title(f"Ablation {report.grid}")
    if report.curves:
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: same data, same bytes
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def write_ablations_table(path: Path, report: Report) -> None:
    rows = report.rows()
    pq.write_table(pa.table({c: [r[c] for r in rows] for c in ABLATIONS_SCHEMA.names}, schema=ABLATIONS_SCHEMA), path)
