"""The figures of a results.json as one PNG (matplotlib: `pip install '.[bench]'`).

    python -m bench.plot bench/results.json bench/results.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLOURS = {"nofilter": "#7f7f7f", "floor": "#1f77b4", "sapd": "#d62728", "relay": "#2ca02c"}
LABELS = {"nofilter": "no filter", "floor": "accept-only\nNFQUEUE", "sapd": "sapd-nfq",
          "relay": "asyncio\nrelay"}


def _bars(ax, table: dict, title: str, unit: str) -> None:
    paths = [p for p in COLOURS if p in table]
    medians = [table[p]["median"] for p in paths]
    low = [table[p]["median"] - table[p]["min"] for p in paths]
    high = [table[p]["max"] - table[p]["median"] for p in paths]
    ax.bar(range(len(paths)), medians, yerr=[low, high], capsize=4,
           color=[COLOURS[p] for p in paths])
    ax.set_xticks(range(len(paths)), [LABELS[p] for p in paths], fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(unit)
    for i, value in enumerate(medians):
        ax.annotate(f"{value:.3g}", (i, value), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 2), textcoords="offset points")


def _grouped(ax, tables: dict[str, dict], title: str, unit: str, log: bool = False) -> None:
    groups = list(tables)
    paths = [p for p in COLOURS if any(p in t for t in tables.values())]
    width = 0.8 / len(paths)
    for j, path in enumerate(paths):
        xs = [i + (j - (len(paths) - 1) / 2) * width for i in range(len(groups))]
        vals = [tables[g].get(path, {}).get("median", 0) for g in groups]
        ax.bar(xs, vals, width, color=COLOURS[path], label=LABELS[path].replace("\n", " "))
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(unit)
    if log:
        ax.set_yscale("log")


def _alternatives(axes, alt: dict) -> None:
    """Bars per configuration: the chosen binding against fnfqueue with GSO."""
    for ax, (key, title, unit) in zip(axes, (
            ("upload_mb_s", "alternatives: SMTP upload", "MB/s"),
            ("upload_packets_per_mb", "alternatives: queued packets per MB uploaded", "packets/MB"),
            ("sessions_per_s", "alternatives: short sessions, 64 clients", "sessions/s"))):
        table = alt[key]
        names = list(table)
        colours = [COLOURS["sapd"] if "sapd" in n else COLOURS["floor"] if "floor" in n
                   else COLOURS["nofilter"] for n in names]
        hatches = ["//" if "fnfqueue" in n else "" for n in names]
        bars = ax.barh(range(len(names)), [table[n]["median"] for n in names], color=colours)
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
        ax.set_yticks(range(len(names)), [n.replace(": ", "\n", 1) for n in names], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(unit + ("  (hatched: fnfqueue + GSO flag)" if key == "upload_mb_s" else ""))


def plot(results: dict, out: Path) -> None:
    s, raw = results["summary"], results["raw"]
    conc = results["plan"]["concurrency"]
    alt = s.get("alternatives")
    fig, axes = plt.subplots(3 if alt else 2, 3, figsize=(15, 12.5 if alt else 8.5))
    _grouped(axes[0][0], {"offloads off": s["pop3_mb_s"], "offloads on": s["pop3_offloads_mb_s"]},
             "POP3 RETR (Dovecot), after login", "MB/s")
    _grouped(axes[0][1], {"offloads off": s["upload_mb_s"], "offloads on": s["upload_offloads_mb_s"]},
             "SMTP upload, 10 MB messages (Postfix)", "MB/s")
    _grouped(axes[0][2], {f"{c} client{'s' if c > 1 else ''}": s[f"sessions_{c}_per_s"] for c in conc},
             "short SMTP sessions (fast responder)", "sessions/s")
    axes[0][2].legend(fontsize=7)
    _grouped(axes[1][0], {f"{q}\n{c} client{'s' if c > 1 else ''}": s[f"sessions_{c}_{q}_ms"]
                          for c in conc for q in ("p50", "p99")},
             "per-command round trip", "ms (log)", log=True)
    ax = axes[1][1]
    for name, points in raw["memory"].items():
        ax.plot([p["flows"] for p in points], [p["rss_mb"] for p in points], "o-",
                color=COLOURS[name], label=LABELS[name].replace("\n", " "))
    ax.axhline(64, color="black", linestyle=":", linewidth=1, label="target 64 MB")
    ax.set_title("process RSS with open sessions", fontsize=10)
    ax.set_xlabel("open SMTP sessions")
    ax.set_ylabel("MB")
    ax.legend(fontsize=7)
    ax = axes[1][2]
    names = list(raw["scaling"])
    for j, name in enumerate(names):
        table = s[f"scaling_{name}_per_s"]
        vals = [table[w]["median"] for w in ("1", "2")]
        xs = [i + (j - (len(names) - 1) / 2) * 0.35 for i in range(2)]
        ax.bar(xs, vals, 0.35, color=COLOURS[name], label=LABELS[name].replace("\n", " "))
    ax.set_xticks([0, 1], ["1 worker", "2 workers"])
    ax.set_title(f"scaling, {results['plan']['scaling_concurrency']} clients", fontsize=10)
    ax.set_ylabel("sessions/s")
    ax.legend(fontsize=7)
    if alt:
        _alternatives(axes[2], alt)
    m = results["machine"]
    fig.suptitle(f"sapd-nfq benchmark, {results['mode']} run, {results['date']}: "
                 f"{m['cpus']} x {m['cpu_model']}, Linux {m['kernel']}, Python {m['python']} "
                 "(bars: median, whiskers: min-max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    source = Path(args[0]) if args else Path(__file__).with_name("results.json")
    out = Path(args[1]) if len(args) > 1 else source.with_suffix(".png")
    plot(json.loads(source.read_text()), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
