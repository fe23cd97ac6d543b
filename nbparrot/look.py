"""How nbparrot's HTML looks in a notebook: JupyterLab's theme colours and its table style.

Colours are JupyterLab's theme variables (so the dark theme reads as well as the light one),
each with a fallback for frontends without them (VS Code's variables, then a plain colour).
Tables copy ``jp-RenderedHTMLCommon``'s: theme font size, a rule under the header, zebra rows.
Styles are inline because widget HTML is not inside JupyterLab's rendered-HTML container.
"""

from __future__ import annotations

import html
from typing import Iterable

__all__ = ["ERROR", "WARN", "TEXT", "MUTED", "BORDER", "ROW", "num", "muted", "error", "table"]

ERROR = "var(--jp-error-color1, var(--vscode-errorForeground, #d32f2f))"
WARN = "var(--jp-warn-color1, var(--vscode-editorWarning-foreground, #f57c00))"
TEXT = "var(--jp-ui-font-color1, inherit)"
MUTED = "var(--jp-ui-font-color2, var(--vscode-descriptionForeground, #757575))"
BORDER = "var(--jp-border-color1, rgba(128, 128, 128, 0.45))"
ROW = "var(--jp-rendermime-table-row-background, rgba(128, 128, 128, 0.1))"
FONT_SIZE = "var(--jp-ui-font-size1, 13px)"
_CELL = "padding:2px 8px;text-align:left;vertical-align:top;line-height:1.35;"


def num(value: int, width: int = 0) -> str:
    """A count that keeps its place as it grows: tabular digits in at least ``width`` characters."""
    text = f"{value:,}"
    return (f"<b style='display:inline-block;min-width:{max(width, len(text))}ch;text-align:right;"
            f"font-variant-numeric:tabular-nums'>{text}</b>")


def muted(text_html: str, css: str = "") -> str:
    """Secondary text (a note, a retry count): the theme's second font colour."""
    cls = f" class='{css}'" if css else ""
    return f"<span{cls} style='color:{MUTED}'>{text_html}</span>"


def error(text_html: str, css: str = "") -> str:
    """What failed in the end: the theme's error colour."""
    cls = f" class='{css}'" if css else ""
    return f"<span{cls} style='color:{ERROR}'>{text_html}</span>"


def table(css: str, header: Iterable[str], rows: Iterable[Iterable[str]], *, escape: bool = True,
          tooltips: Iterable[Iterable[str]] | None = None) -> str:
    """A compact table in JupyterLab's style; cells are escaped unless ``escape=False`` (already HTML)."""
    cell = (lambda v: html.escape(str(v))) if escape else str
    head = "".join(f"<th style='{_CELL}font-weight:bold'>{cell(h)}</th>" for h in header)
    tips = iter(tooltips) if tooltips is not None else None
    body = []
    for k, row in enumerate(rows):
        row_tips = next(tips) if tips is not None else None
        cells = []
        for j, value in enumerate(row):
            tip = f" title='{html.escape(row_tips[j])}'" if row_tips and row_tips[j] else ""
            cells.append(f"<td style='{_CELL}'{tip}>{cell(value)}</td>")
        shade = f" style='background:{ROW}'" if k % 2 else ""  # zebra, as JupyterLab's even rows
        body.append(f"<tr{shade}>{''.join(cells)}</tr>")
    return (f"<table class='{css}' style='border-collapse:collapse;border-spacing:0;margin:4px 0 0 0;"
            f"font-size:{FONT_SIZE};color:{TEXT};table-layout:auto'>"
            f"<thead style='border-bottom:1px solid {BORDER}'><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")
