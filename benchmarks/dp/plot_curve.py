"""Plots benchmarks/dp/curve.csv (from the ignored test
`accuracy_epsilon_curve` in tests/tests/privacy.rs) as
benchmarks/dp/accuracy_epsilon.svg. Standard library only."""
import csv
import math
import os
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
rows = list(csv.DictReader(open(os.path.join(HERE, "curve.csv"))))
by_eps = defaultdict(list)
baseline = []
for r in rows:
    if r["epsilon"] == "inf":
        baseline.append(float(r["accuracy"]))
    else:
        # Round to the target (the spent epsilon is just under it).
        by_eps[round(float(r["epsilon"]), 2)].append(float(r["accuracy"]))
points = sorted((e, sum(a) / len(a), min(a), max(a)) for e, a in by_eps.items())
base = sum(baseline) / len(baseline)

W, H, L, R, T, B = 640, 400, 70, 20, 40, 60
xs = [math.log2(p[0]) for p in points]
x0, x1 = min(xs) - 0.3, max(xs) + 0.3
lo = min(min(p[2] for p in points), base) - 5
y0, y1 = max(0.0, 5 * math.floor(lo / 5)), 100.0
sx = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)
sy = lambda y: T + (y1 - y) / (y1 - y0) * (H - T - B)
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W/2}" y="22" text-anchor="middle" font-size="14">digits, 4000 clients x 20 samples, q = 0.05, 40 rounds, delta = 1e-5</text>']
for y in range(int(y0), 101, 5):
    out.append(f'<line x1="{L}" x2="{W-R}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>')
    out.append(f'<text x="{L-8}" y="{sy(y)+4:.1f}" text-anchor="end">{y}%</text>')
for (e, *_), x in zip(points, xs):
    out.append(f'<text x="{sx(x):.1f}" y="{H-B+18}" text-anchor="middle">{e:g}</text>')
out.append(f'<text x="{(L+W-R)/2}" y="{H-15}" text-anchor="middle">epsilon (log scale)</text>')
out.append(f'<text x="18" y="{(T+H-B)/2}" text-anchor="middle" transform="rotate(-90 18 {(T+H-B)/2})">central test accuracy</text>')
out.append(f'<line x1="{L}" x2="{W-R}" y1="{sy(base):.1f}" y2="{sy(base):.1f}" stroke="#888" stroke-dasharray="6 4"/>')
out.append(f'<text x="{W-R-4}" y="{sy(base)-6:.1f}" text-anchor="end" fill="#555">no DP {base:.1f}%</text>')
path = " ".join(f'{"M" if i == 0 else "L"}{sx(x):.1f},{sy(p[1]):.1f}' for i, (x, p) in enumerate(zip(xs, points)))
out.append(f'<path d="{path}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
for x, p in zip(xs, points):
    out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{sy(p[2]):.1f}" y2="{sy(p[3]):.1f}" stroke="#1f77b4"/>')
    out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(p[1]):.1f}" r="4" fill="#1f77b4"/>')
out.append('</svg>')
open(os.path.join(HERE, "accuracy_epsilon.svg"), "w").write("\n".join(out) + "\n")
for e, m, a, b in points:
    print(f"| {e:g} | {m:.2f}% | {a:.2f}-{b:.2f}% |")
print(f"| no DP | {base:.2f}% | |")
