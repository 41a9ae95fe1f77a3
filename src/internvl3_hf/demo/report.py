"""The recipe demo's outputs: the accuracy table (text) and a PNG of the loss curves and accuracy per stage.

The PNG is drawn with Pillow alone (no plotting library needed).
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from . import tasks

STAGE_COLOURS = {"pre-training": (52, 101, 164), "SFT": (78, 154, 6), "MPO": (204, 0, 0), "Best-of-N": (117, 80, 123)}
GREY = (120, 120, 120)
LIGHT = (225, 225, 225)


# --------------------------------------------------------------------------------------------------- table
BON_COMPARISONS = (
    ("prm_vote", "(same candidates: PRM-weighted vote)"),
    ("majority", "(same candidates: majority vote)"),
)


def format_table(report) -> str:
    """A Markdown table: held-out accuracy after each stage (visual, per kind, text), with counts; below the
    Best-of-N stage, the other selections from the same candidates."""
    header = ["stage", "visual QA (held-out)", *tasks.KINDS, "text-only", "stage time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for stage in report.stages:
        lines.append(_row(stage.name, stage.visual, stage.text, f"{stage.seconds:.0f} s"))
    for name, label in BON_COMPARISONS:
        if name in report.extra.get("bon", {}):
            lines.append(_row(label, *report.extra["bon"][name], ""))
    footer = (
        f"\nchance (uniform guess per kind) {report.chance:.1%}, majority answer per kind {report.majority_baseline:.1%}; "
        f"total wall time {report.seconds:.0f} s"
    )
    if "critic_auc" in report.extra:
        footer += "\ncritic step AUC (right vs wrong held-out steps; 0.5 = blind): " + ", ".join(
            f"{group} {value:.2f}" for group, value in report.extra["critic_auc"].items()
        )
    return "\n".join(lines) + footer


def _row(label: str, visual: dict[str, list[bool]], text: list[bool], last: str) -> str:
    correct, total = sum(sum(v) for v in visual.values()), sum(len(v) for v in visual.values())
    cells = [label, f"{correct / max(1, total):.1%} ({correct}/{total})"]
    cells += [f"{sum(visual[kind])}/{len(visual[kind])}" if visual.get(kind) else "-" for kind in tasks.KINDS]
    cells += [f"{sum(text) / max(1, len(text)):.1%} ({sum(text)}/{len(text)})", last]
    return "| " + " | ".join(cells) + " |"


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
    draw.text((left, top - 22), "held-out accuracy after each stage (visual QA | text-only)", fill=(0, 0, 0), font=font)
    plot = (left + 44, top + 4, right - 8, bottom - 40)
    draw.rectangle(plot, outline=GREY)
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        y = plot[3] - tick * (plot[3] - plot[1])
        draw.line((plot[0], y, plot[2], y), fill=LIGHT)
        draw.text((left, y - 7), f"{tick:.0%}", fill=GREY, font=small)
    chance_y = plot[3] - report.chance * (plot[3] - plot[1])
    for x in range(int(plot[0]), int(plot[2]), 12):
        draw.line((x, chance_y, x + 6, chance_y), fill=(0, 0, 0), width=1)
    slot = (plot[2] - plot[0]) / max(1, len(report.stages))
    for index, stage in enumerate(report.stages):
        colour = STAGE_COLOURS.get(stage.name, GREY)
        pale = tuple(int(c + (255 - c) * 0.55) for c in colour)
        x0 = plot[0] + index * slot + slot * 0.15
        width = slot * 0.33
        for offset, value, fill, label in ((0, stage.visual_accuracy, colour, f"{stage.visual_correct}/{stage.visual_total}"),
                                           (width + 4, stage.text_accuracy, pale, f"{sum(stage.text)}/{len(stage.text)}")):
            y = plot[3] - value * (plot[3] - plot[1])
            draw.rectangle((x0 + offset, y, x0 + offset + width, plot[3]), fill=fill)
            draw.text((x0 + offset, y - 16), f"{value:.0%}", fill=(0, 0, 0), font=small)
            draw.text((x0 + offset, plot[3] + 4), label, fill=GREY, font=small)
        draw.text((x0, plot[3] + 20), stage.name, fill=(0, 0, 0), font=font)
    draw.text((plot[2] - 90, chance_y - 16), f"chance {report.chance:.0%}", fill=(0, 0, 0), font=small)  # over the bars


def write_png(report, path: str | Path, width: int = 1200, height: int = 820) -> Path:
    """Four loss curves (pre-training, SFT, MPO, the critic) above a bar chart of the accuracy per stage."""
    path = Path(path)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small, big = _font(15), _font(12), _font(18)
    draw.text((20, 12), f"InternVL3 recipe on a laptop: tiny model, {report.seconds:.0f} s wall time", fill=(0, 0, 0), font=big)
    titles = {"pre-training": "1. pre-training loss (square-weighted)", "SFT": "2. SFT loss", "MPO": "3. MPO loss",
              "Best-of-N": "4. critic (implicit PRM) MPO loss"}
    panel_width = (width - 40) / 4
    for index, stage in enumerate(report.stages[:4]):
        left = 20 + index * panel_width
        box = (left, 80, left + panel_width - 16, 360)
        _loss_panel(draw, box, titles.get(stage.name, stage.name), stage.losses, STAGE_COLOURS.get(stage.name, GREY), font, small)
    _accuracy_panel(draw, (20, 430, width - 20, height - 20), report, font, small)
    image.save(path)
    return path
