"""The run report: per-stage sections (markdown + json) and the assembled report.md with plots.

Each stage writes `sections/NN-<stage>.md` and `.json` (NN = its place in the pipeline).
`python -m nanopipe.report reset` starts a new run; `python -m nanopipe.report generate` assembles
`report.md` from whatever sections exist: a missing stage shows as "—", never as a crash.
"""

import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from nanopipe import cli
from nanopipe.common import atomic_write_text, format_duration, get_base_dir

STAGE_TITLES = {
    "tok_train": "Tokenizer training",
    "tok_eval": "Tokenizer evaluation",
    "base_train": "Base model training",
    "base_eval": "Base model evaluation",
    "chat_sft": "Chat SFT",
    "chat_eval_base": "Chat evaluation (base model)",
    "chat_eval_sft": "Chat evaluation (SFT model)",
}
STAGES = list(STAGE_TITLES)
REPO_ROOT = Path(__file__).resolve().parents[1]


def report_dir() -> Path:
    """NANOPIPE_REPORT_DIR, else the repo's report/ folder, else <base>/report for a non-editable install."""
    if os.environ.get("NANOPIPE_REPORT_DIR"):
        path = Path(os.environ["NANOPIPE_REPORT_DIR"])
    elif (REPO_ROOT / "report" / "README.md").exists():
        path = REPO_ROOT / "report"
    else:
        path = get_base_dir() / "report"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _section_stem(stage: str) -> str:
    return f"{STAGES.index(stage) + 1:02d}-{stage}"


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def write_section(stage: str, markdown: str, data: dict, series: dict | None = None, config: dict | None = None,
                  seconds: float | None = None, command: str | None = None):
    """Write one stage's section. `series` maps a name to {x, y, xlabel, ylabel} for the plots."""
    sections = report_dir() / "sections"
    record = {"stage": stage, "timestamp": _now(), "seconds": seconds, "command": command,
              "config": config or {}, "data": data, "series": series or {}}
    stem = _section_stem(stage)
    atomic_write_text(sections / f"{stem}.json", json.dumps(record, indent=2, default=_json_default) + "\n")
    md = f"## {STAGE_TITLES[stage]}\n\n"
    if command:
        md += f"`{command}`  \n"
    md += f"finished {record['timestamp']}"
    if seconds is not None:
        md += f", took {format_duration(seconds)}"
    md += "\n\n" + markdown.strip() + "\n"
    atomic_write_text(sections / f"{stem}.md", md)


def _json_default(obj):
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def read_sections(folder: Path | None = None) -> dict:
    """{stage: record} for every stage whose json is present and parseable."""
    folder = (folder or report_dir()) / "sections"
    found = {}
    for stage in STAGES:
        path = folder / f"{_section_stem(stage)}.json"
        if path.exists():
            try:
                found[stage] = json.loads(path.read_text())
            except json.JSONDecodeError:
                print(f"warning: {path} is not valid json; skipping it", file=sys.stderr)
    return found


def reset():
    """Start a new run: drop old sections and plots, remember when the run started."""
    folder = report_dir()
    for name in ("sections", "plots"):
        shutil.rmtree(folder / name, ignore_errors=True)
    (folder / "report.md").unlink(missing_ok=True)
    atomic_write_text(folder / "run.json", json.dumps({"started": _now()}) + "\n")
    print(f"report reset: {folder}")


# ---------------------------------------------------------------------------------------------
# environment facts for the header

def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _ram_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import torch

    env = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "ram_gb": _ram_gb(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            env["gpus"].append({"name": props.name, "memory_gb": props.total_memory / 1e9})
    commit = _git("rev-parse", "--short", "HEAD")
    env["git_commit"] = commit
    env["git_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None
    return env


# ---------------------------------------------------------------------------------------------
# summary table

DASH = "—"


def fmt(value, digits=4) -> str:
    """A report table cell: a dash for a missing or NaN value, floats to `digits` places, large ints grouped."""
    if value is None:
        return DASH
    if isinstance(value, float):
        if math.isnan(value):
            return DASH
        return f"{value:.{digits}f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def _get(sections: dict, stage: str, *keys):
    node = sections.get(stage, {}).get("data")
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def core_label(data: dict | None) -> str:
    """'CORE', or 'CORE (20/22)' when some of the bundle's tasks were missing."""
    if data and data.get("core_tasks") is not None and data.get("core_tasks") != data.get("core_tasks_total"):
        return f"CORE ({data['core_tasks']}/{data['core_tasks_total']})"
    return "CORE"


def summary_rows(sections: dict) -> list[tuple[str, str, str]]:
    """(metric, BASE, SFT) rows; BASE comes from the base-model stages, SFT from the SFT stages."""
    val_bpb = _get(sections, "base_eval", "bpb", "val")
    if val_bpb is None:
        val_bpb = _get(sections, "base_train", "val_bpb")
    rows = [
        ("val bpb", fmt(val_bpb), DASH),
        (core_label(sections.get("base_eval", {}).get("data")), fmt(_get(sections, "base_eval", "core")), DASH),
    ]
    chat_tasks = []
    for stage in ("chat_eval_base", "chat_eval_sft"):
        for name in (_get(sections, stage, "tasks") or {}):
            if name not in chat_tasks:
                chat_tasks.append(name)
    for name in chat_tasks:
        rows.append((name, fmt(_get(sections, "chat_eval_base", "tasks", name, "accuracy")),
                     fmt(_get(sections, "chat_eval_sft", "tasks", name, "accuracy"))))
    rows.append(("ChatCORE", fmt(_get(sections, "chat_eval_base", "chatcore")),
                 fmt(_get(sections, "chat_eval_sft", "chatcore"))))
    rows.append(("train loss (final)", fmt(_get(sections, "base_train", "final_train_loss")),
                 fmt(_get(sections, "chat_sft", "train_loss"))))
    rows.append(("val loss (SFT conversations)", DASH, fmt(_get(sections, "chat_sft", "val_loss"))))
    mfu_base, mfu_sft = _get(sections, "base_train", "mfu"), _get(sections, "chat_sft", "mfu")
    rows.append(("MFU %", fmt(mfu_base, 2), fmt(mfu_sft, 2)))
    rows.append(("tok/s (training)", fmt(_round(_get(sections, "base_train", "tok_per_sec"))),
                 fmt(_round(_get(sections, "chat_sft", "tok_per_sec")))))
    return rows


def _round(x):
    return int(round(x)) if isinstance(x, (int, float)) else x


# ---------------------------------------------------------------------------------------------
# SVG plots (a small writer of our own, so the report needs no plotting library)

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
SPARSE_POINTS = 40  # a line with at most this many points (e.g. evals every N steps) gets a marker per point
LOG_SPAN = 10.0  # a positive axis whose max/min reaches this is drawn log-scale
# base_train's series drawn together, train loss on the left axis and val bpb on the right
OVERLAYS = {"base_train": ("train_loss", "val_bpb")}


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), default=raw)
    first = math.ceil(lo / step) * step
    ticks = []
    value = first
    while value <= hi + 1e-12 * max(1.0, abs(hi)):
        ticks.append(round(value, 12))
        value += step
    return ticks


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks per decade within [lo, hi]; only the powers of ten when that makes too many."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks = [m * 10 ** d for d in decades for m in (1, 2, 5) if lo <= m * 10 ** d <= hi * (1 + 1e-9)]
    return ticks if len(ticks) <= 9 else [t for t in ticks if math.log10(t) == round(math.log10(t))]


def _tick_label(value: float) -> str:
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.3g}"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


class _Axis:
    """Maps data values to pixels along [p0, p1] (p0 for the low end), linear or log10."""

    def __init__(self, values: list[float], p0: float, p1: float, allow_log: bool):
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        self.log = allow_log and lo > 0 and hi / lo >= LOG_SPAN
        if self.log:
            self.lo, self.hi = lo / 1.1, hi * 1.1  # a little room at both ends
        else:
            if hi == lo:
                lo, hi = lo - 0.5, hi + 0.5
            self.lo, self.hi = lo, hi
        self.p0, self.p1 = p0, p1

    def __call__(self, v: float) -> float:
        if self.log:
            f = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            f = (v - self.lo) / (self.hi - self.lo)
        return self.p0 + f * (self.p1 - self.p0)

    def ticks(self) -> list[float]:
        return _log_ticks(self.lo, self.hi) if self.log else _nice_ticks(self.lo, self.hi)


def svg_line_plot(lines: list[dict], title: str, xlabel: str, ylabel: str, right_ylabel: str | None = None,
                  width=720, height=360) -> str:
    """lines: [{"label", "x": [...], "y": [...], "axis": "left" | "right"}]; non-finite points are dropped.

    A y axis whose positive values span a factor of LOG_SPAN or more is log-scale; sparse lines get a marker per
    point; the legend sits right of the plot area, never on the data; `right_ylabel` adds a second y axis for
    the lines with axis "right".
    """
    pad_left, pad_top, pad_bottom = 64, 32, 48
    pad_right = 180 + (56 if right_ylabel else 0)  # the legend column (and the right axis)
    plot_w, plot_h = width - pad_left - pad_right, height - pad_top - pad_bottom
    x0, x1, y_bottom, y_top = pad_left, pad_left + plot_w, pad_top + plot_h, pad_top
    points = [[(float(x), float(y)) for x, y in zip(line["x"], line["y"])
               if y is not None and math.isfinite(float(y)) and math.isfinite(float(x))] for line in lines]
    sides = [line.get("axis", "left") if right_ylabel else "left" for line in lines]
    xs = [p[0] for pts in points for p in pts]
    x_axis = _Axis(xs, x0, x1, allow_log=False)
    if xs and min(xs) == max(xs):
        x_axis = _Axis([xs[0], xs[0] + 1], x0, x1, allow_log=False)
    y_axes = {side: _Axis([p[1] for pts, s in zip(points, sides) if s == side for p in pts], y_bottom, y_top, True)
              for side in set(sides) | {"left"}}

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{pad_left + plot_w / 2:.1f}" y="18" text-anchor="middle" font-size="14">{_escape(title)}</text>']
    left = y_axes["left"]
    for t in left.ticks():
        y = left(t)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick_label(t)}</text>')
    if "right" in y_axes and right_ylabel:
        for t in y_axes["right"].ticks():
            y = y_axes["right"](t)
            out.append(f'<line x1="{x1}" y1="{y:.1f}" x2="{x1 + 4}" y2="{y:.1f}" stroke="#333"/>')
            out.append(f'<text x="{x1 + 7}" y="{y + 4:.1f}" text-anchor="start">{_tick_label(t)}</text>')
        yc = pad_top + plot_h / 2
        out.append(f'<text x="{x1 + 50}" y="{yc:.1f}" text-anchor="middle" '
                   f'transform="rotate(90 {x1 + 50} {yc:.1f})">{_escape(right_ylabel)}</text>')
    for t in x_axis.ticks():
        x = x_axis(t)
        out.append(f'<line x1="{x:.1f}" y1="{y_top}" x2="{x:.1f}" y2="{y_bottom}" stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{y_bottom + 16}" text-anchor="middle">{_tick_label(t)}</text>')
    out.append(f'<rect x="{x0}" y="{y_top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{x0 + plot_w / 2:.1f}" y="{height - 10}" text-anchor="middle">{_escape(xlabel)}</text>')
    yc = pad_top + plot_h / 2
    out.append(f'<text x="14" y="{yc:.1f}" text-anchor="middle" transform="rotate(-90 14 {yc:.1f})">'
               f'{_escape(ylabel)}{" (log scale)" if left.log else ""}</text>')
    legend_x = x1 + (70 if right_ylabel else 14)
    for i, (line, pts, side) in enumerate(zip(lines, points, sides)):
        color = _COLORS[i % len(_COLORS)]
        y_axis = y_axes[side]
        coords = [(x_axis(x), y_axis(y)) for x, y in pts]
        if len(coords) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        if len(coords) <= SPARSE_POINTS:
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in coords]
        ly = pad_top + 8 + 16 * i
        label = line.get("label", "") + (" (right axis)" if side == "right" else "")
        out.append(f'<line x1="{legend_x}" y1="{ly:.1f}" x2="{legend_x + 16}" y2="{ly:.1f}" stroke="{color}" '
                   f'stroke-width="2"/>')
        out.append(f'<text x="{legend_x + 20}" y="{ly + 4:.1f}" fill="{color}">{_escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_plots(sections: dict, folder: Path) -> list[tuple[str, str]]:
    """One SVG per recorded series group, grouped by (stage, ylabel), plus the OVERLAYS; [(title, relative path)]."""
    plots = []

    def save(stage, name, svg, title):
        slug = f"{stage}-{''.join(c if c.isalnum() else '_' for c in name)}.svg"
        atomic_write_text(folder / "plots" / slug, svg)
        plots.append((title, f"plots/{slug}"))

    for stage, record in sections.items():
        series = {name: s for name, s in (record.get("series") or {}).items() if s.get("x")}
        overlay = OVERLAYS.get(stage)
        if overlay and all(name in series for name in overlay):
            left, right = (series[name] for name in overlay)
            title = f"{STAGE_TITLES[stage]}: {left.get('ylabel')} and {right.get('ylabel')}"
            lines = [{"label": overlay[0], **left, "axis": "left"}, {"label": overlay[1], **right, "axis": "right"}]
            save(stage, "overlay", svg_line_plot(lines, title, left.get("xlabel", "step"), left.get("ylabel", ""),
                                                 right_ylabel=right.get("ylabel", "")), title)
        groups: dict[str, list] = {}
        for name, s in series.items():
            groups.setdefault(s.get("ylabel", name), []).append({"label": name, **s})
        for ylabel, lines in groups.items():
            title = f"{STAGE_TITLES[stage]}: {ylabel}"
            save(stage, ylabel, svg_line_plot(lines, title, lines[0].get("xlabel", "step"), ylabel), title)
    return plots


# ---------------------------------------------------------------------------------------------
# report.md

def generate(dollars_per_hour: float | None = None, folder: Path | None = None) -> Path:
    folder = folder or report_dir()
    sections = read_sections(folder)
    env = environment()
    missing = [s for s in STAGES if s not in sections]
    run_info = {}
    if (folder / "run.json").exists():
        run_info = json.loads((folder / "run.json").read_text())

    lines = ["# nanopipe run report", ""]
    lines.append(f"- generated: {_now()}")
    if run_info.get("started"):
        lines.append(f"- run started: {run_info['started']}")
    if env["git_commit"]:
        lines.append(f"- git commit: {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}")
    lines.append(f"- hardware: {env['cpu']} ({env['cpu_count']} cores), "
                 f"{fmt(env['ram_gb'], 1)} GB RAM; "
                 + (", ".join(f"{g['name']} ({g['memory_gb']:.0f} GB)" for g in env["gpus"]) or "no GPU"))
    lines.append(f"- software: Python {env['python']}, torch {env['torch']}, CUDA {env['cuda'] or 'none'}")
    lines.append("")

    stage_seconds = {s: r.get("seconds") for s, r in sections.items() if r.get("seconds") is not None}
    total = sum(stage_seconds.values())
    lines += ["## Summary", "", "| metric | BASE | SFT |", "|---|---|---|"]
    lines += [f"| {m} | {b} | {s} |" for m, b, s in summary_rows(sections)]
    lines += ["", "| stage | wall time |", "|---|---|"]
    for stage in STAGES:
        secs = stage_seconds.get(stage)
        lines.append(f"| {STAGE_TITLES[stage]} | {format_duration(secs) if secs is not None else DASH} |")
    lines.append(f"| **total** | **{format_duration(total)}** |")
    lines.append("")
    if dollars_per_hour is not None:
        lines.append(f"Estimated cost: ${total / 3600 * dollars_per_hour:.2f} "
                     f"({format_duration(total)} at ${dollars_per_hour:.2f}/hour).")
        lines.append("")
    if missing:
        lines.append(f"Stages not run (yet): {', '.join(missing)}.")
        lines.append("")

    plots = write_plots(sections, folder)
    if plots:
        lines += ["## Plots", ""] + [f"![{title}]({path})" for title, path in plots] + [""]

    commands = [r["command"] for r in sections.values() if r.get("command")]
    if commands:
        lines += ["## Commands", "", "```"] + commands + ["```", ""]

    for stage in STAGES:
        md_path = folder / "sections" / f"{_section_stem(stage)}.md"
        if md_path.exists():
            lines += [md_path.read_text().rstrip(), ""]
    out = folder / "report.md"
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"report written: {out}")
    if missing:
        print(f"missing stages: {', '.join(missing)}")
    return out


def main(argv=None):
    parser = cli.ArgumentParser(prog="python -m nanopipe.report", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("reset", help="start a new run: delete old sections and plots")
    gen = sub.add_parser("generate", help="assemble report.md from the sections present")
    gen.add_argument("--dollars-per-hour", type=cli.nonnegative(), default=None,
                     help="machine price, for the cost estimate")
    args = parser.parse_args(argv)
    if args.command == "reset":
        reset()
    else:
        generate(args.dollars_per_hour)


if __name__ == "__main__":
    main()
