"""HTML pieces of `simulate report`: one self-contained page (inline CSS, plots as data: URLs, no external URL)."""

from __future__ import annotations

import base64
from html import escape
from typing import Any, Iterable, Sequence

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1500px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.meta { color: #555; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th { background: #f4f4f4; } tr.marked td { background: #fff6d5; } td.key, th.key { text-align: left; }
th small { display: block; font-weight: normal; color: #777; }
ul.checks { list-style: none; padding: 0; }
ul.checks li { margin: 4px 0; padding: 6px 10px; border-left: 6px solid #999; background: #f7f7f7; }
.state { display: inline-block; min-width: 3.5em; font-weight: bold; }
.pass { border-color: #2e7d32 !important; } .pass .state, td.pass { color: #2e7d32; }
.fail { border-color: #c62828 !important; background: #fdecea !important; } .fail .state, td.fail { color: #c62828; }
.na { border-color: #999 !important; } .na .state { color: #777; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; } figure img { width: 700px; max-width: 100%; border: 1px solid #eee; }
"""

STATE_TEXT = {"pass": "PASS", "fail": "FAIL", "n/a": "N/A"}


def number(value: Any, digits: int = 3) -> str:
    """A cell: floats to `digits` decimals (tiny and huge ones in g format), None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, bool) or not isinstance(value, float):
        return escape(str(value))
    if value != value:  # NaN
        return "NaN"
    return f"{value:.{digits}f}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.3g}"


def table(columns: Sequence[str], rows: Iterable[dict[str, Any]], keys: int = 1,
          notes: dict[str, str] | None = None, table_id: str | None = None, marked: Iterable[int] = ()) -> str:
    """An HTML table; the first `keys` columns are row names (left-aligned); `notes` adds a grey line under a
    header; rows numbered in `marked` are highlighted."""
    notes = notes or {}
    marked = set(marked)
    head = "".join(f'<th class="{"key" if i < keys else "num"}">{escape(c)}'
                   f'{f"<small>{escape(notes[c])}</small>" if c in notes else ""}</th>' for i, c in enumerate(columns))
    body = "".join(('<tr class="marked">' if n in marked else "<tr>") + "".join(
        f'<td class="key">{escape(str(row.get(c, "")))}</td>' if i < keys else f"<td>{number(row.get(c))}</td>"
        for i, c in enumerate(columns)) + "</tr>" for n, row in enumerate(rows))
    ident = f' id="{escape(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(key: str, png: bytes, description: str) -> str:
    """A plot as an inline PNG (a data: URL: the page needs no other file); `description` is its alt text."""
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="plot-{escape(key.replace("/", "-"))}"><img alt="{escape(description)}" '
            f'src="data:image/png;base64,{data}"></figure>')


def check_item(ident: str, name: str, state: str, detail: str, threshold: str) -> str:
    """One check of the pass/fail list: `<li id="check-...">` with its state as class and data attribute."""
    css = "na" if state == "n/a" else state
    return (f'<li id="check-{escape(ident)}" class="check {css}" data-state="{escape(state)}">'
            f'<span class="state">{STATE_TEXT[state]}</span> <b class="name">{escape(name)}</b> — '
            f'<span class="detail">{escape(detail)}</span> <span class="threshold">({escape(threshold)})</span></li>')


def page(title: str, sections: Iterable[str]) -> str:
    """The whole document."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")
