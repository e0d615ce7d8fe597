"""What a structured run reports beside the sparsity table: units removed, parameters before/after, timing.

A compacted model holds no zeros, so its sparsity table says 0%: these sections say what was removed
instead — per kind (filters, neurons, heads, layers), per group set, and parameters per layer — in the
console, `sparsity_report.md` and `plots/structured_parameters.png`, from `results.json`'s `structured`
(`StructuredReport.as_dict`) and `compaction` entries. Forward times appear only as the compaction
measured them: medians of interleaved rounds of the model before and after (`compact_and_measure`).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from lightning_prune.run.outputs import write_bytes


def _title(structured: dict[str, Any]) -> str:
    before, after = int(structured["parameters_before"]), int(structured["parameters_after"])
    return (
        f"Structured pruning ({structured['method']}): {before:,} → {after:,} parameters "
        f"(ratio {structured['parameter_ratio']:.4f}, {before - after:,} removed)"
    )


def _units_line(structured: dict[str, Any]) -> str:
    units = structured.get("units", {})
    return "; ".join(f"{kind} removed: {n['removed']} of {n['total']}" for kind, n in units.items())


def added_line(structured: dict[str, Any]) -> str | None:
    """What the method added (FLAP's compensation biases), or None when nothing."""
    added, extra = structured.get("added_parameters") or {}, structured.get("added_for_config") or []
    if not added:
        return None
    line = f"{structured['method']} added {len(added)} bias parameters ({sum(added.values()):,} elements)"
    if extra:
        line += f", {len(extra)} of them ({sum(added[n] for n in extra):,} elements) only for the config flag, at zero"
    return line


def timing_line(compaction: dict[str, Any]) -> str | None:
    """The forward times of the compaction, or None when it measured none."""
    if "forward_seconds_before" not in compaction or "timing_rounds" not in compaction:
        return None  # no batch to time, or a record from before timings were interleaved
    before, after = compaction["forward_seconds_before"] * 1e3, compaction["forward_seconds_after"] * 1e3
    return (
        f"forward on one training batch, median of {int(compaction['timing_rounds'])} interleaved rounds "
        f"(before and after compaction, alternating): {before:.3f} ms → {after:.3f} ms "
        f"(speedup {compaction['speedup']:.2f}×)"
    )


def structured_markdown(structured: dict[str, Any], compaction: dict[str, Any]) -> str:
    """The structured section of `sparsity_report.md`: totals, units per kind and group set, parameters per layer."""
    lines = [f"## {_title(structured)}", ""]
    if structured.get("units"):
        lines += ["| units | removed | total |", "|---|---:|---:|"]
        lines += [f"| {kind} | {n['removed']} | {n['total']} |" for kind, n in structured["units"].items()]
        lines.append("")
    if structured.get("kept"):
        lines += ["| group | kind | removed | kept | total |", "|---|---|---:|---:|---:|"]
        for name, (kept, total) in structured["kept"].items():
            lines.append(f"| {name} | {structured['kinds'].get(name, 'unit')} | {total - kept} | {kept} | {total} |")
        lines.append("")
    if structured.get("layer_parameters"):
        lines += ["| layer | params before | params after |", "|---|---:|---:|"]
        lines += [f"| {name} | {b} | {a} |" for name, (b, a) in structured["layer_parameters"].items()]
        lines.append("")
    if structured.get("dropped_blocks"):
        lines += [f"Dropped blocks: {structured['dropped_blocks']}", ""]
    lines += [f"Note: {note}" for note in structured.get("notes", [])]
    if added_line(structured):
        lines += [f"Added: {added_line(structured)}", ""]
    timing = timing_line(compaction)
    if timing is not None:
        lines += [f"Timing: {timing}", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def structured_console(structured: dict[str, Any], compaction: dict[str, Any]) -> list[object]:
    """What the console prints: a rich table of the units removed per group set, titled with the parameter
    totals, then the units per kind and the timing, each a line."""
    from rich.table import Table

    table = Table(title=_title(structured))
    for column in ("group", "kind", "removed", "kept", "total"):
        table.add_column(column, justify="left" if column in ("group", "kind") else "right")
    for name, (kept, total) in structured.get("kept", {}).items():
        table.add_row(name, structured["kinds"].get(name, "unit"), str(total - kept), str(kept), str(total))
    for index in structured.get("dropped_blocks", []):
        table.add_row(f"block {index}", "layer", "1", "0", "1")
    lines = [_units_line(structured), added_line(structured), timing_line(compaction), *structured.get("notes", [])]
    return [table, *(line for line in lines if line)]


def plot_parameters(structured: dict[str, Any], path: Path) -> None:
    """Horizontal bars: the parameters of every layer compaction changes, before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = structured.get("layer_parameters", {})
    names = list(layers)
    figure, axes = plt.subplots(figsize=(7, 1.5 + 0.45 * max(len(names), 1)))
    positions = list(range(len(names)))
    axes.barh([p - 0.2 for p in positions], [b for b, _ in layers.values()], height=0.4, label="before")
    axes.barh([p + 0.2 for p in positions], [a for _, a in layers.values()], height=0.4, label="after")
    axes.set_yticks(positions, names)
    axes.invert_yaxis()
    axes.set_xlabel("parameters")
    axes.set_title(_title(structured), fontsize=9)
    axes.legend(loc="lower right")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    write_bytes(path, buffer.getvalue())
    plt.close(figure)
