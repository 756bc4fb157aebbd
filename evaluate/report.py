"""What `camface evaluate` prints and writes: every number as JSON, a table of the means beside
the random baseline's, the ranking."""

from __future__ import annotations

import math
from pathlib import Path

RANDOM = "random"
# metric -> (JSON key, label, True when higher is better)
METRICS = {"deletion": ("deletion_auc", "deletion AUC", False),
           "insertion": ("insertion_auc", "insertion AUC", True),
           "average_drop": ("average_drop_pct", "avg drop %", False),
           "increase": ("increase_in_confidence_pct", "incr. conf. %", True)}
RANKED_BY = "deletion"  # the metric the ranking follows


def to_json(scores, predicted, probability, graph, *, source, frames, every, steps, baseline, seconds) -> dict:
    """The report: settings, per-crop predictions, per-method scores (means, curves, per crop),
    ranks per metric (1 = most faithful; the random baseline is ranked too) and the comparison
    of each method with the random baseline."""
    from camface import __version__
    from camface.evaluate.scores import SCORED, scored_output

    info = graph.info
    methods = {s.method: s.to_json() for s in scores}
    ranks = rank(methods)
    versus = {}
    if RANDOM in methods:
        floor = methods[RANDOM]
        for name, m in methods.items():
            if name != RANDOM:
                versus[name] = {metric: (m[key] > floor[key]) if higher else (m[key] < floor[key])
                                for metric, (key, _, higher) in METRICS.items()}
    return {
        "camface_evaluate": 1, "camface_version": __version__,
        "settings": {"source": str(source), "frames_read": frames, "every": every, "crops": len(predicted),
                     "model": str(graph.path), "target_layer": info.target_layer,
                     "token_grid": info.token_grid or None,
                     "feature_size": list(info.feature_size), "input_size": list(info.input_size),
                     "steps": steps, "baseline": baseline, "provider": graph.provider,
                     "explained_class": "predicted", "color_order": info.color_order,
                     "scored": SCORED[scored_output(info)]},
        "crops": {"predicted": [int(p) for p in predicted],
                  "predicted_label": [info.labels[p] for p in predicted],
                  "probability": [round(float(p), 6) for p in probability]},
        "seconds": seconds,
        "methods": methods,
        "ranks": ranks,
        "beats_random": versus,
        "ranking": ranking(ranks),
    }


def strict_json(value):
    """`value` (dicts, lists, numbers, strings) with every NaN or infinity replaced by None, so
    that `json.dumps(..., allow_nan=False)` writes strict JSON (`null` where a metric is
    undefined, e.g. Average Drop over no crop with a positive score)."""
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def rank(methods: dict) -> dict:
    """{metric: {method: rank}} of `methods` ({method: MethodScores.to_json()}, the random
    baseline included), 1 = most faithful; ties keep the order of `methods` (the registry's)."""
    ranks = {}
    for metric, (key, _, higher) in METRICS.items():
        # an undefined score (NaN or None: Average Drop over no crop with a positive score) ranks
        # last; sorting on NaN itself gives an order that depends on where it sits
        def order_key(m, key=key, higher=higher):
            value = methods[m][key]
            defined = isinstance(value, int | float) and math.isfinite(value)
            return (not defined, (-value if higher else value) if defined else 0.0)

        order = sorted(methods, key=order_key)
        ranks[metric] = {m: order.index(m) + 1 for m in methods}
    return ranks


def ranking(ranks: dict) -> list[str]:
    """The methods, most faithful first, without the random baseline: by RANKED_BY (deletion
    AUC, see the README's "Which map to trust"). `camface export` records this list in the graph."""
    return sorted((m for m in ranks[RANKED_BY] if m != RANDOM), key=lambda m: ranks[RANKED_BY][m])


def format_table(report: dict) -> str:
    settings, methods = report["settings"], report["methods"]
    from camface.realtime.config import every_nth_frame

    frames = (f"{every_nth_frame(settings['every'], settings['frames_read'])} of {settings['frames_read']}" if settings["frames_read"]
              else "snapshots")
    lines = [f"camface evaluate: {settings['source']} ({frames}, {settings['crops']} face crops), "
             f"{Path(settings['model']).name} at {settings['target_layer']}, explaining each crop's predicted class",
             f"curves and drops score the {settings.get('scored', 'probability of the explained class')}",
             f"deletion / insertion: {settings['steps']} steps, removed pixels -> "
             + ("the crop blurred (sigma = side/8)" if settings["baseline"] == "blur" else "the crop's mean colour")
             + f"; {report['seconds']['crops'] + report['seconds']['scores']:.1f} s "
               f"({report['seconds']['scores']:.1f} s scoring"
             + (f", {report['seconds']['sanity']:.1f} s sanity checks" if "sanity" in report["seconds"] else "") + ")", ""]
    header = f"{'rank':<5}{'method':<20}" + "".join(
        f"{label + (' (+)' if higher else ' (-)'):>22}" for _, label, higher in METRICS.values()) + f"{'crops/s':>10}"
    sanity = report.get("sanity")
    if sanity:
        header += f"  {'sanity: randomised model / random class':<44}"
    lines.append(header)
    floor = methods.get(RANDOM)
    order = report["ranking"] + ([RANDOM] if floor else [])
    for name in order:
        m = methods[name]
        cells = []
        for metric, (key, _, higher) in METRICS.items():
            text = f"{m[key]:.3f}" if "auc" in key else f"{m[key]:.1f}"
            if floor and name != RANDOM:
                delta = m[key] - floor[key]
                text += f" ({delta:+.3f})" if "auc" in key else f" ({delta:+.1f})"
                text += " " if report["beats_random"][name][metric] else "!"
            cells.append(text)
        rank = "-" if name == RANDOM else str(report["ranks"]["deletion"][name] - (
            1 if floor and report["ranks"]["deletion"][RANDOM] < report["ranks"]["deletion"][name] else 0))
        row = f"{rank:<5}{name:<20}" + "".join(f"{c:>22}" for c in cells) + f"{m['crops_per_second']:>10.0f}"
        if sanity and name in sanity:
            row += f"  {sanity_cell(sanity[name]):<44}"
        lines.append(row)
    lines.append("")
    lines.append("(-) lower is better, (+) higher is better; in brackets: the difference to the random baseline, "
                 "! where a method does not beat it")
    if sanity:
        from camface.evaluate.sanity import SPEARMAN_PASS, SSIM_SAME

        for name in (n for n in sanity if n not in methods):  # Guided Backprop / Guided Grad-CAM
            lines.append(f"{'-':<5}{name:<20}{'(TensorFlow, not in the graph: no faithfulness scores)':<98}"
                         f"  {sanity_cell(sanity[name]):<44}")

        steps = next(iter(sanity.values()))["model_randomization"]["steps"]
        lines.append(f"sanity (Adebayo et al. 2018): weights re-drawn from the logits down in {len(steps)} steps "
                     f"({', '.join(steps)}); rho = median Spearman of |map| against the original once the head is re-drawn, "
                     f"and with every weight re-drawn (passes when both < {SPEARMAN_PASS}); SSIM of the predicted class's map against a random "
                     f"other class's (passes < {SSIM_SAME})")
    if floor:
        losers = [name for name, beats in report["beats_random"].items() if not beats["deletion"]]
        lines.append("ranked by deletion AUC; " + ("every method beats the random baseline on deletion AUC" if not losers
                                                   else f"NOT better than random on deletion AUC: {', '.join(losers)}"))
    return "\n".join(lines)


def sanity_cell(result: dict) -> str:
    """One method's sanity verdicts: 'pass'/'FAIL' per test, with its figure ('n/a' for a figure
    that is undefined: no crop whose original map is non-zero, JSON null)."""
    randomised, logit = result["model_randomization"], result["random_logit"]
    head = randomised["spearman"][randomised["steps"].index(randomised["head_step"])]

    def figure(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    return (f"{'pass' if randomised['passed'] else 'FAIL'} (rho {figure(head, '+.2f')}, "
            f"{figure(randomised['spearman'][-1], '+.2f')}) / "
            f"{'pass' if logit['passed'] else 'FAIL'} (SSIM {figure(logit['ssim'], '.2f')})")
