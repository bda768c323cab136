"""What the book's chapters share: result tables (HTML on the page, plain text for nbval)."""
import html
import numbers


def _cell(v, fmt):
    if isinstance(v, numbers.Real) and not isinstance(v, (bool, numbers.Integral)):
        return format(v, fmt)
    return "" if v is None else str(v)


class Table:
    """A small results table: shown as HTML in the book, compared as plain text by nbval.

    rows are sequences of cells; float cells are formatted with `fmt` (a format spec, e.g. ".3g")
    unless already strings. `caption` is shown above the table.
    """

    def __init__(self, rows, header, fmt=".4g", caption=None):
        self.header = [str(h) for h in header]
        self.rows = [[_cell(v, fmt) for v in row] for row in rows]
        for i, row in enumerate(self.rows):
            if len(row) != len(self.header):
                raise ValueError(f"rows[{i}] has {len(row)} cells, header has {len(self.header)}")
        self.caption = caption

    def _repr_html_(self):
        esc = html.escape
        head = "".join(f"<th>{esc(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                       for row in self.rows)
        cap = f"<caption>{esc(self.caption)}</caption>" if self.caption else ""
        return (f'<table class="bnlib-table">{cap}<thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table>")

    def __repr__(self):
        cols = [self.header] + self.rows
        widths = [max(len(r[j]) for r in cols) for j in range(len(self.header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cols]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(([self.caption] if self.caption else []) + lines)


def table(rows, header, fmt=".4g", caption=None):
    """A Table (see there): the last expression of a cell, or passed to display()."""
    return Table(rows, header, fmt=fmt, caption=caption)
