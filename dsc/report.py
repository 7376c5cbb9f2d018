"""Render pass history: a text table (`report`) and a self-contained HTML page (`visualize`)."""

from __future__ import annotations

import html
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dsc.runtime.cuda_graphs import host_waits

__all__ = ["records", "report", "visualize"]


def records(history: list[dict[str, Any]]) -> list[SimpleNamespace]:
    """History entries loaded from a plan, with the same attributes as PassRecord."""
    return [SimpleNamespace(**h) for h in history]


def _summary(rec: Any) -> str:
    parts = [f"+{v} {k}" for k, v in sorted(rec.added.items()) if not k.startswith(("placeholder", "output"))]
    parts += [f"-{v} {k}" for k, v in sorted(rec.removed.items())]
    return ", ".join(parts) if parts else "no change"


def report(history: list[Any], plan: Any = None) -> str:
    """The pipeline as a table: program, pass, what it changed, time; then kernel choices."""
    rows = [("program", "pass", "nodes", "ms", "changes")]
    for rec in history:
        nodes = sum(rec.counts.values())
        rows.append((rec.program, rec.name, str(nodes), f"{rec.seconds * 1e3:.1f}", _summary(rec)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
        if i == 0:
            lines.append("-" * (sum(widths) + 8 + 40))
    if plan is not None:
        lines.append("")
        stamped, layers = plan.model.get("stamped_layers", 0), plan.model.get("num_layers")
        if stamped:
            lines.append(f"trace: {layers - stamped} of {layers} layers traced, "
                         f"{stamped} stamped from the last of them")
        elif plan.model.get("not_stamped_because"):
            lines.append(f"trace: whole model ({plan.model['not_stamped_because']})")
        attention = _attention_summary(plan)
        if attention:
            lines.append(attention)
        waits = host_waits(plan.programs["decode"]) if "decode" in plan.programs else []
        if plan.target.device == "cuda" and plan.target.cuda_graphs and waits:
            lines.append(f"decode step not replayed as a CUDA graph: {len(waits)} steps make the "
                         f"host wait (no kernel takes them), first {waits[0]}")
        for name, program in plan.programs.items():
            ops: dict[str, int] = {}
            for step in program.steps:
                ops[step["op"]] = ops.get(step["op"], 0) + 1
            chosen = {}
            for impl in program.kernels.values():
                chosen[impl] = chosen.get(impl, 0) + 1
            peak = plan.model.get("peak_activation_bytes", {}).get(name)
            lines.append(f"entry point {name}: {len(program.steps)} steps, inputs {program.inputs[:3]}"
                         + (" + cache" if len(program.inputs) > 3 else "")
                         + (f", peak activations {_mib(peak)}" if peak is not None else ""))
            if chosen:
                lines.append("  kernels: " + ", ".join(f"{k} x{v}" for k, v in sorted(chosen.items())))
    return "\n".join(lines)


def _attention_summary(plan: Any) -> str:
    """One line on the attention layers of the plan's decode (or forward) program: how many,
    which attend within a sliding window, which carry ALiBi slopes or attention sinks."""
    program = plan.programs.get("decode") or plan.programs.get("forward")
    steps = [s for s in program.steps if "attention" in s["op"]] if program else []
    if not steps:
        return ""
    windows = [s["kwargs"].get("window", 0) for s in steps]
    parts = [f"attention: {len(steps)} layers"]
    by_window: dict[int, int] = {}
    for window in filter(None, windows):
        by_window[window] = by_window.get(window, 0) + 1
    parts += [f"{count} within a sliding window of {window}"
              for window, count in sorted(by_window.items())]
    alibi = sum(s["kwargs"].get("alibi") is not None for s in steps)
    if alibi:
        parts.append(f"{alibi} with ALiBi slopes")
    sinks = sum(s["kwargs"].get("sinks") is not None for s in steps)
    if sinks:
        parts.append(f"{sinks} with attention sinks")
    return ", ".join(parts)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;display:flex;height:100vh}
nav{width:320px;overflow:auto;border-right:1px solid #ccc;padding:8px;background:#fafafa}
nav a{display:block;padding:4px 6px;color:#222;text-decoration:none;border-radius:4px}
nav a:hover{background:#e8eefc} main{flex:1;overflow:auto;padding:12px}
section{display:none} section:target{display:block}
pre{font-size:12px;line-height:1.35} .new{background:#fff2a8} .dsc{color:#0645ad;font-weight:600}
.meta{color:#555;font-size:13px}
"""


def visualize(history: list[Any], plan: Any, path: str | os.PathLike) -> Path:
    """Write one self-contained HTML page: the graph after every pass, new nodes highlighted."""
    nav, sections = [], []
    for i, rec in enumerate(history):
        anchor = f"p{i}"
        nav.append(f'<a href="#{anchor}">{i}. [{html.escape(rec.program)}] {html.escape(rec.name)}'
                   f' <span class="meta">{html.escape(_summary(rec))[:60]}</span></a>')
        new = set(getattr(rec, "new_nodes", []) or [])
        lines = []
        for line in rec.graph.splitlines():
            name = line.strip().split(" ")[0].lstrip("%")
            text = html.escape(line)
            if "dsc." in line:
                text = f'<span class="dsc">{text}</span>'
            if name in new:
                text = f'<span class="new">{text}</span>'
            lines.append(text)
        sections.append(
            f'<section id="{anchor}"><h2>{i}. {html.escape(rec.name)} '
            f'<small>({html.escape(rec.program)}, {rec.seconds * 1e3:.1f} ms)</small></h2>'
            f'<p class="meta">{html.escape(_summary(rec))}</p><pre>{"<br>".join(lines)}</pre></section>'
        )
    title = html.escape(str(plan.model.get("name", "model")) if plan is not None else "model")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>dsc passes: {title}</title>"
        f"<style>{_STYLE}</style></head><body><nav><h3>dsc passes: {title}</h3>{''.join(nav)}</nav>"
        f"<main><p>Pick a pass on the left: the graph after it, nodes it added highlighted.</p>"
        f"{''.join(sections)}</main></body></html>"
    )
    out = Path(path)
    out.write_text(page)
    return out
