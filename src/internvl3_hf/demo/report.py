"""The recipe demo's outputs: the accuracy table with 95 % intervals and paired differences between stages (text),
and a PNG of the loss curves and accuracy per stage.

The PNG is drawn with Pillow alone (no plotting library needed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from . import tasks

STAGE_COLOURS = {"pre-training": (52, 101, 164), "SFT": (78, 154, 6), "MPO": (204, 0, 0)}
BEST_OF_N_COLOUR = (117, 80, 123)
GREY = (120, 120, 120)
LIGHT = (225, 225, 225)
Z95 = 1.959963984540054  # the two-sided 95 % quantile of the normal distribution


# --------------------------------------------------------------------------------------------------- statistics
def proportion_interval(values: Sequence[bool]) -> tuple[float, float, float]:
    """The share of `values` that are true, with its 95 % Wilson score interval (sound near 0 and 1)."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0, 0.0
    p = sum(values) / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return p, centre - half, centre + half


def paired_difference(after: Sequence[bool], before: Sequence[bool]) -> tuple[float, float, float]:
    """The mean per-question difference `after - before` over the same questions, with its 95 % interval (normal
    approximation on the per-question differences: what two stages disagree on, not their separate noise)."""
    if len(after) != len(before) or not after:
        raise ValueError(f"paired results need the same questions: {len(after)} against {len(before)}")
    differences = [int(a) - int(b) for a, b in zip(after, before)]
    n = len(differences)
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / max(1, n - 1)
    half = Z95 * math.sqrt(variance / n)
    return mean, mean - half, mean + half


def rises(after: Sequence[bool], before: Sequence[bool]) -> bool:
    """A stage rises over the one before when the paired 95 % interval of the difference lies above 0."""
    return paired_difference(after, before)[1] > 0


# --------------------------------------------------------------------------------------------------- table
def _share(values: Sequence[bool]) -> str:
    return f"{sum(values)}/{len(values)}" if values else "-"


def _percent(values: Sequence[bool]) -> str:
    return f"{sum(values) / len(values):.1%} ({_share(values)})" if values else "-"


def _interval(values: Sequence[bool]) -> str:
    _, low, high = proportion_interval(values)
    return f"{low:.1%} – {high:.1%}"


def _difference(after: Sequence[bool], before: Sequence[bool]) -> str:
    mean, low, high = paired_difference(after, before)
    return f"{100 * mean:+.1f} ({100 * low:+.1f} … {100 * high:+.1f})"


HEADER = ("stage", "reasoning (held-out)", "95 % interval",
          "Δ reasoning vs the stage above, points (paired 95 % interval)", *tasks.REASONING_TEMPLATES, "perception",
          "text-only")


def format_table(report) -> str:
    """A Markdown table: held-out accuracy after each stage (reasoning with its 95 % interval and the paired
    difference to the stage before, per template, perception, text-only); below the Best-of-N stage, the other
    selections from the same candidates and pass@N; then the checks, the run's settings and, apart from the
    results (they vary with the machine's load), the times."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    previous = None
    for stage in report.stages:
        delta = _difference(stage.reasoning, previous.reasoning) if previous else ""
        lines.append(_row(stage.name, stage.groups, delta))
        previous = stage
    bon = report.extra.get("bon", {})
    n = report.extra.get("bon_n", "N")
    for name, label in (("prm_vote", "(same candidates: PRM-weighted vote)"),
                        ("majority", "(same candidates: majority vote)"),
                        ("pass", f"(pass@{n}: a right answer among the {n})")):
        if name in bon:
            lines.append(_row(label, bon[name], ""))
    return "\n".join(lines) + "\n\n" + "\n".join(checks(report)) + "\n" + _footer(report)


def _row(label: str, groups: dict[str, list[bool]], delta: str) -> str:
    reasoning = [ok for template in tasks.REASONING_TEMPLATES for ok in groups.get(template, [])]
    perception = [ok for kind in tasks.PERCEPTION_KINDS for ok in groups.get(kind, [])]
    cells = [label, _percent(reasoning), _interval(reasoning), delta]
    cells += [_share(groups.get(template, [])) for template in tasks.REASONING_TEMPLATES]
    cells += [_share(perception), _percent(groups.get("text", []))]
    return "| " + " | ".join(cells) + " |"


def checks(report) -> list[str]:
    """What the run shows, stage by stage: does each stage rise over the one before on the held-out reasoning
    (paired 95 % interval above 0), and how far is text-only after SFT from pre-training."""
    lines = []
    for before, after in zip(report.stages, report.stages[1:]):
        mean, low, high = paired_difference(after.reasoning, before.reasoning)
        verdict = "rises" if low > 0 else ("falls" if high < 0 else "no difference beyond noise")
        lines.append(f"{after.name} vs {before.name}, reasoning: {100 * mean:+.1f} points "
                     f"(paired 95 % interval {100 * low:+.1f} … {100 * high:+.1f}): {verdict}")
    names = [stage.name for stage in report.stages]
    if "pre-training" in names and "SFT" in names:
        text = 100 * (sum(report.stage("SFT").text) / max(1, len(report.stage("SFT").text))
                      - sum(report.stage("pre-training").text) / max(1, len(report.stage("pre-training").text)))
        lines.append(f"text-only, SFT vs pre-training: {text:+.1f} points")
    return lines


def _footer(report) -> str:
    extra = report.extra
    lines = [f"chance on reasoning (uniform guess over 0-{2 * tasks.MAX_SHAPES}) {report.chance:.1%}"]
    if "sft_slips" in extra:
        slips = extra["sft_slips"]
        lines.append(f"SFT data: {slips['slipped']} of {slips['reasoning']} reasoning solutions hold the annotator's "
                     f"slip ({tasks.SLIP_RATE:.0%} of the `{tasks.SLIP_TEMPLATE}` ones)")
    if "mpo_pairs" in extra:
        stats = extra["mpo_pairs"]
        lines.append(f"MPO pairs from {stats['mixed']} of {stats['questions']} questions with sound and unsound "
                     "samples")
    if "critic_auc" in extra:
        lines.append("critic step AUC (right vs wrong held-out steps; 0.5 = blind): " + ", ".join(
            f"{group} {value:.2f}" for group, value in extra["critic_auc"].items()))
    if report.settings:
        lines.append(report.settings)
    times = ", ".join(f"{stage.name} {stage.seconds:.0f} s" for stage in report.stages)
    lines.append(f"\nwall time: {times}; total {report.seconds:.0f} s")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- PNG
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _nice_ticks(low: float, high: float, count: int = 4) -> list[float]:
    if high <= low:
        high = low + 1
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), default=raw)
    first = math.ceil(low / step) * step
    ticks, value = [], first
    while value <= high + 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _loss_panel(draw: ImageDraw.ImageDraw, box, title: str, losses, colour, font, small) -> None:
    left, top, right, bottom = box
    draw.text((left, top - 22), title, fill=(0, 0, 0), font=font)
    plot = (left + 44, top + 4, right - 8, bottom - 22)
    draw.rectangle(plot, outline=GREY)
    if not losses:
        draw.text((plot[0] + 10, plot[1] + 10), "no losses logged", fill=GREY, font=small)
        return
    steps = [s for s, _ in losses]
    values = [v for _, v in losses]
    low, high = min(values), max(values)
    pad = (high - low) * 0.05 or 0.5
    low, high = low - pad, high + pad
    first, last = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1

    def xy(step, value):
        x = plot[0] + (step - first) / (last - first) * (plot[2] - plot[0])
        y = plot[3] - (value - low) / (high - low) * (plot[3] - plot[1])
        return x, y

    for tick in _nice_ticks(low, high):
        _, y = xy(first, tick)
        if plot[1] <= y <= plot[3]:
            draw.line((plot[0], y, plot[2], y), fill=LIGHT)
            draw.text((left, y - 7), f"{tick:g}", fill=GREY, font=small)
    for tick in _nice_ticks(first, last):
        x, _ = xy(tick, low)
        if plot[0] <= x <= plot[2]:
            draw.text((x - 8, plot[3] + 4), f"{int(tick)}", fill=GREY, font=small)
    points = [xy(s, v) for s, v in losses]
    if len(points) > 1:
        draw.line(points, fill=colour, width=2)
    else:
        x, y = points[0]
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)


def _accuracy_panel(draw: ImageDraw.ImageDraw, box, report, font, small) -> None:
    left, top, right, bottom = box
    draw.text((left, top - 22), "held-out accuracy after each stage (reasoning with its 95 % interval | text-only)",
              fill=(0, 0, 0), font=font)
    plot = (left + 44, top + 4, right - 8, bottom - 40)
    draw.rectangle(plot, outline=GREY)

    def y_of(value: float) -> float:
        return plot[3] - value * (plot[3] - plot[1])

    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        draw.line((plot[0], y_of(tick), plot[2], y_of(tick)), fill=LIGHT)
        draw.text((left, y_of(tick) - 7), f"{tick:.0%}", fill=GREY, font=small)
    for x in range(int(plot[0]), int(plot[2]), 12):
        draw.line((x, y_of(report.chance), x + 6, y_of(report.chance)), fill=(0, 0, 0), width=1)
    slot = (plot[2] - plot[0]) / max(1, len(report.stages))
    for index, stage in enumerate(report.stages):
        colour = STAGE_COLOURS.get(stage.name, BEST_OF_N_COLOUR)
        pale = tuple(int(c + (255 - c) * 0.55) for c in colour)
        x0 = plot[0] + index * slot + slot * 0.15
        width = slot * 0.33
        for offset, values, fill in ((0, stage.reasoning, colour), (width + 4, stage.text, pale)):
            value = sum(values) / max(1, len(values))
            draw.rectangle((x0 + offset, y_of(value), x0 + offset + width, plot[3]), fill=fill)
            draw.text((x0 + offset, y_of(value) - 16), f"{value:.0%}", fill=(0, 0, 0), font=small)
            draw.text((x0 + offset, plot[3] + 4), _share(values), fill=GREY, font=small)
        _, low, high = proportion_interval(stage.reasoning)
        middle = x0 + width / 2
        draw.line((middle, y_of(low), middle, y_of(high)), fill=(0, 0, 0), width=2)
        for y in (y_of(low), y_of(high)):
            draw.line((middle - 6, y, middle + 6, y), fill=(0, 0, 0), width=2)
        draw.text((x0, plot[3] + 20), stage.name, fill=(0, 0, 0), font=font)
    draw.text((plot[2] - 90, y_of(report.chance) - 16), f"chance {report.chance:.0%}", fill=(0, 0, 0), font=small)


def write_png(report, path: str | Path, width: int = 1200, height: int = 820) -> Path:
    """Four loss curves (pre-training, SFT, MPO, the critic) above a bar chart of the accuracy per stage."""
    path = Path(path)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small, big = _font(15), _font(12), _font(18)
    draw.text((20, 12), f"InternVL3 recipe on a laptop: tiny model, {report.seconds:.0f} s wall time", fill=(0, 0, 0), font=big)
    titles = {"pre-training": "1. pre-training loss (square-weighted)", "SFT": "2. SFT loss", "MPO": "3. MPO loss"}
    panel_width = (width - 40) / 4
    for index, stage in enumerate(report.stages[:4]):
        left = 20 + index * panel_width
        box = (left, 80, left + panel_width - 16, 360)
        title = titles.get(stage.name, "4. critic (implicit PRM) MPO loss")
        _loss_panel(draw, box, title, stage.losses, STAGE_COLOURS.get(stage.name, BEST_OF_N_COLOUR), font, small)
    _accuracy_panel(draw, (20, 430, width - 20, height - 20), report, font, small)
    image.save(path)
    return path
