"""Draw pipeline programs, simulated timelines and measured traces: ASCII rows and PNG plots.

``ascii_timeline`` shows a program as the order of passes per stage, or a timeline on a time
grid with idle cells as dots. ``plot_timeline`` draws a timeline or a list of trace events
(``minipar.observe.trace``) with matplotlib, one row per stage or rank. matplotlib is imported
inside the plotting functions, so importing this module stays cheap. Plots are drawn on a bare
``Figure`` with its own Agg canvas, never through pyplot: saving a PNG must not switch the
backend of a live notebook (``matplotlib.use("Agg")`` there hides every later inline figure).
"""

from __future__ import annotations

import math
from typing import Any

from minipar.parallel.schedules import COMPUTE_KINDS, Program
from minipar.observe.trace import kind_group, timeline_events

# One colour per kind, chosen to read in greyscale too (dark forward, mid backward, light W).
COLORS = {
    "fwd": "#3b6fb6", "bwd": "#d9822b", "bwd_input": "#d9822b", "bwd_weight": "#5aa05a",
    "comm": "#8c8c8c", "sync": "#8064a2", "step": "#7a5c3e", "other": "#b0b0b0",
    "idle": "#f0f0f0",
}
_LEGEND = {"fwd": "forward", "bwd": "backward", "bwd_input": "backward (input grad, B)",
           "bwd_weight": "backward (weight grad, W)", "comm": "communication",
           "sync": "grad sync", "step": "optimiser step", "other": "other", "idle": "idle"}


def _color_key(kind: str) -> str:
    if kind in COLORS:
        return kind
    return "comm" if kind_group(kind) == "comm" else "other"


# ------------------------------------------------------------------------------------- ASCII
def ascii_timeline(program_or_timeline: Any, width: int | None = None,
                   comm: bool = False) -> str:
    """One row per stage: ``stage 0 | F0 F1 F2 F3 .. .. B0 B1 B2 B3``.

    From a ``Program``: the order of the passes (with ``comm``, sends and receives too).
    From a simulator ``Timeline``: a time grid whose cell is the shortest pass (coarser when
    the row would pass ``width`` characters, default 160); a pass shows its label in its first
    cell and blanks after, an idle cell shows ``..``.
    """
    if isinstance(program_or_timeline, Program):
        return program_or_timeline.text(width, comm)
    return _ascii_grid(program_or_timeline, 160 if width is None else width)


def _ascii_grid(tl: Any, width: int) -> str:
    passes = [e for e in tl.events if e.kind in COMPUTE_KINDS and e.end > e.start]
    p = tl.n_stages
    if not passes:
        return "\n".join(f"stage {s} |" for s in range(p))
    cell = max(len(e.label) for e in passes) + 1
    prefix = len(f"stage {p - 1} | ")
    quantum = min(e.end - e.start for e in passes)
    n = math.ceil(tl.makespan / quantum - 1e-9)
    max_cells = max(1, (width - prefix) // cell)
    if n > max_cells:
        n = max_cells
        quantum = tl.makespan / n
    lines = [f"{tl.name}: makespan {float(tl.makespan):g}, bubble {float(tl.bubble_fraction):.3f}"]
    for s in range(p):
        mine = [e for e in passes if e.stage == s]
        cells, prev, j = [], None, 0
        for k in range(n):
            lo, hi = k * quantum, (k + 1) * quantum
            while j < len(mine) and mine[j].end <= lo:
                j += 1
            best, overlap = None, 0
            for e in mine[j:]:
                if e.start >= hi:
                    break
                ov = min(hi, e.end) - max(lo, e.start)
                if ov > overlap:
                    best, overlap = e, ov
            if best is None:
                cells.append("..".ljust(cell))
            elif best is prev:
                cells.append(" " * cell)
            else:
                cells.append(best.label.ljust(cell))
            prev = best
        lines.append((f"stage {s:<{len(str(p - 1))}} | " + "".join(cells)).rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- matplotlib
def _figure(figsize: tuple[float, float]):
    """A figure with an Agg canvas of its own, unknown to pyplot (no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def plot_timeline(events_or_timeline: Any, path: str, title: str | None = None,
                  time_unit: str | None = None) -> str:
    """Save a PNG timeline: one row per stage (or rank), passes coloured by kind, idle grey.

    Accepts a simulator ``Timeline`` or a list of trace event dicts. Times are seconds, drawn
    in s, ms or us; a timeline simulated with other costs (``unit_cost``: a forward costs 1)
    names its unit in ``time_unit`` and is drawn unscaled. Communication, sync and step are
    drawn as thin bars at the bottom of a row, so spans nested inside a pass (a
    tensor-parallel allreduce during a forward) stay visible. Microbatch numbers are written
    in the boxes wide enough to hold them. Returns ``path``.
    """
    from matplotlib.patches import Patch

    if isinstance(events_or_timeline, list):
        events = events_or_timeline
        name = title
    else:
        events = timeline_events(events_or_timeline)
        name = title or f"{events_or_timeline.name} (simulated)"
    rows = sorted({int(e["rank"]) for e in events})
    t_end = max((float(e["end"]) for e in events), default=1.0) or 1.0
    scale, unit = (1.0, time_unit) if time_unit else _time_unit(t_end)
    fig_w = min(16.0, max(8.0, 0.04 * len(events) / max(1, len(rows)) + 6))
    fig, ax = _figure((fig_w, 0.55 * len(rows) + 1.6))
    ax.set_xlim(0, t_end * scale)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    fig.canvas.draw()
    px_per_unit = ax.get_window_extent().width / (t_end * scale)
    # Every row starts as idle; passes are drawn over it, so measured traces show idle too.
    for y in range(len(rows)):
        ax.broken_barh([(0, t_end * scale)], (y - 0.4, 0.8), facecolors=COLORS["idle"])
    used = {"idle"}
    for e in events:
        y = rows.index(int(e["rank"]))
        x0, dx = float(e["start"]) * scale, (float(e["end"]) - float(e["start"])) * scale
        if dx <= 0 or e["kind"] == "idle":
            continue  # the background shows idle; zero-cost sends of a unit-cost simulation
        key = _color_key(e["kind"])
        used.add(key)
        args = e.get("args", {})
        thin = key not in ("fwd", "bwd", "bwd_input", "bwd_weight", "other")
        h = 0.25 if thin else 0.8
        yb = y + 0.4 - h if thin else y - 0.4
        # Odd chunks of an interleaved schedule are lighter, so chunks can be told apart.
        alpha = 0.65 if args.get("chunk", 0) % 2 else 1.0
        ax.broken_barh([(x0, dx)], (yb, h), facecolors=COLORS[key], alpha=alpha,
                       edgecolors="white" if not thin else "none", linewidth=0.6)
        if not thin and args.get("mb") is not None:
            # "3" for microbatch 3, "3.1" when the label carries a chunk (interleaved).
            text = f"{args['mb']}.{args.get('chunk', 0)}" if "." in e["name"] else str(args["mb"])
            if dx * px_per_unit > 7 * len(text) + 4:
                ax.text(x0 + dx / 2, y, text, ha="center", va="center", fontsize=8,
                        color="white" if key in ("fwd", "bwd_weight") else "black")
    ax.set_yticks(range(len(rows)))
    label = "stage" if not isinstance(events_or_timeline, list) else "rank"
    ax.set_yticklabels([f"{label} {r}" for r in rows])
    ax.set_xlabel(f"time ({unit})")
    order = [k for k in COLORS if k in used]
    ax.legend(handles=[Patch(color=COLORS[k], label=_LEGEND[k]) for k in order],
              loc="upper center", bbox_to_anchor=(0.5, -0.3 if len(rows) < 4 else -0.18),
              ncol=min(4, len(order)), frameon=False, fontsize=8)
    if name:
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _time_unit(t_end: float) -> tuple[float, str]:
    """Pick seconds, ms or us so that axis numbers are readable."""
    if t_end >= 1 or t_end <= 0:
        return 1.0, "s"
    if t_end >= 1e-3:
        return 1e3, "ms"
    return 1e6, "us"


def plot_losses(losses: dict[str, list[float]] | list[float], path: str,
                title: str | None = None) -> str:
    """Save a PNG of one or several loss curves against the step number. Returns ``path``."""
    curves = losses if isinstance(losses, dict) else {"loss": list(losses)}
    fig, ax = _figure((7, 4))
    for name, ys in curves.items():
        ax.plot(range(len(ys)), [float(y) for y in ys], label=name, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean cross-entropy per scored token, nats)")
    if len(curves) > 1:  # a legend only when it tells curves apart
        ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    ax.set_title(title or "training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


__all__ = ["ascii_timeline", "plot_timeline", "plot_losses", "COLORS"]
