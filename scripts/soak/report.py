"""Summary and plot of a scripts/soak.sh run: reads the CSV, writes an SVG (three
panels: RSS, open descriptors, upstream sockets; bounces marked) and a Markdown
summary. Hand-written SVG so the soak needs no plotting package.

    python3 report.py CSV SVG MD PARAMS WRK_LINE SLOW_LINE COMMIT WARNINGS
"""
import csv
import sys

csv_path, svg_path, md_path, params, wrk, slow, commit, warnings = sys.argv[1:9]
rows = list(csv.DictReader(open(csv_path)))
t = [int(r["t_s"]) / 60 for r in rows]
series = [
    ("RSS (MiB)", [int(r["rss_kib"]) / 1024 for r in rows]),
    ("open descriptors", [int(r["fds"]) for r in rows]),
    ("upstream sockets", [int(r["upstream_sockets"]) for r in rows]),
]
downs = [int(r["t_s"]) / 60 for r in rows if "down" in r["event"]]


def slope_per_10min(xs, ys):
    n = len(xs)
    if n < 3:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 10 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


# Warm-up: the first 10 minutes of a long run, the first third of a short one.
warm = min(10.0, t[-1] / 3 if t else 0)
after = [(x, y) for x, y in zip(t, series[0][1]) if x >= warm]
slope = slope_per_10min([a for a, _ in after], [b for _, b in after])

W, H, PAD, GAP = 760, 170, 60, 30
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{(H + GAP) * 3 + 30}" font-family="sans-serif" font-size="11">',
       f'<rect width="100%" height="100%" fill="white"/>',
       f'<text x="{PAD}" y="16" font-size="13">canary soak {commit}: {params}</text>']
tmax = max(t) if t else 1
for i, (name, ys) in enumerate(series):
    top = 30 + i * (H + GAP)
    lo, hi = 0, max(ys) * 1.15 if ys and max(ys) > 0 else 1
    x = lambda v: PAD + (W - PAD - 20) * v / (tmax or 1)
    y = lambda v: top + H - H * (v - lo) / (hi - lo)
    svg.append(f'<rect x="{PAD}" y="{top}" width="{W - PAD - 20}" height="{H}" fill="none" stroke="#999"/>')
    svg.append(f'<text x="{PAD + 4}" y="{top + 14}" font-weight="bold">{name}</text>')
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        svg.append(f'<text x="{PAD - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
        svg.append(f'<line x1="{PAD}" x2="{W - 20}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
    for d in downs:
        svg.append(f'<line x1="{x(d):.1f}" x2="{x(d):.1f}" y1="{top}" y2="{top + H}" stroke="#e88" stroke-dasharray="4,3"/>')
    pts = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in zip(t, ys))
    svg.append(f'<polyline points="{pts}" fill="none" stroke="#2563eb" stroke-width="1.5"/>')
    for k in range(6):
        v = tmax * k / 5
        svg.append(f'<text x="{x(v):.1f}" y="{top + H + 13}" text-anchor="middle">{v:.1f} min</text>')
svg.append(f'<text x="{PAD}" y="{(H + GAP) * 3 + 22}" fill="#c44">dashed: an upstream instance bounced (down)</text>')
svg.append("</svg>")
open(svg_path, "w").write("\n".join(svg))

rss = series[0][1]
fds = series[1][1]
ups = series[2][1]
last = rows[-1] if rows else {}
md = f"""# canary soak — {csv_path.rsplit('/', 1)[-1].removesuffix('.csv')}

Commit {commit}. {params}.

| | |
|---|---|
| duration | {tmax:.1f} min, {len(rows)} samples |
| RSS | start {rss[0]:.1f} MiB, max {max(rss):.1f} MiB, end {rss[-1]:.1f} MiB |
| RSS slope after {warm:.1f} min of warm-up | {slope:+.2f} MiB per 10 min (goal: under 1) |
| open descriptors | start {fds[0]}, min {min(fds)}, max {max(fds)}, end {fds[-1]} |
| upstream sockets | start {ups[0]}, min {min(ups)}, max {max(ups)}, end {ups[-1]} |
| requests (canary's count) | {last.get('requests', '?')}, failures {last.get('failures', '?')}, client aborts {last.get('client_aborts', '?')} |
| load generator | `{wrk}` |
| slow clients | `{slow}` |
| warnings and errors in canary's log | {warnings} |
"""
open(md_path, "w").write(md)
