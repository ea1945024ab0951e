"""The benchmark's terminal table and speedup chart."""
import sys

from .measure import baselines


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def print_table(records, peak_flops, device):
    base_names = list(baselines(device))
    head = f"{'case':<14}{'mode':<9}{'dtype':<10}{'fused ms':>10}"
    for b in base_names:
        head += f"{b + ' ms':>12}{'vs ' + b:>11}"
    head += f"{'GFLOP/s':>9}{'% peak':>8}{'mem fused/' + base_names[0]:>18}"
    print(head)
    print("-" * len(head))
    for r in records:
        line = f"{r['case']:<14}{r['mode']:<9}{r['dtype']:<10}{r['median_s']['fused'] * 1e3:>10.3f}"
        for b in base_names:
            s = r["speedup"][b]
            line += f"{r['median_s']['nn-' + b] * 1e3:>12.3f}{s:>10.2f}x"
        gf = r["gflops"]["fused"]
        pct = 100.0 * gf * 1e9 / peak_flops[r["dtype"]]
        line += f"{gf:>9.1f}{pct:>7.1f}%"
        mem = r.get("peak_memory_bytes", {})
        if mem.get("fused") and mem.get("nn-" + base_names[0]):
            line += f"{mem['fused'] / 2**20:>9.1f}/{mem['nn-' + base_names[0]] / 2**20:.1f} MB"
        print(line)
    print("speedup = nn.LSTM time / fused_lstm time (>1: fused_lstm is faster; over several "
          "processes, times and speedups are medians of the per-process ones). GFLOP/s and % "
          "of the large-matmul peak are fused_lstm's.")


def plot(records, path, device, title):
    """Writes the speedup chart; returns False when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is not installed: no chart (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_names = list(baselines(device))
    groups = [f"{r['case']}\n{r['mode']}" + ("" if r["dtype"] == "float32" else f"\n{r['dtype']}")
              for r in records]
    width = 0.8 / len(base_names)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(records)), 4.5))
    for i, b in enumerate(base_names):
        xs = [k + (i - (len(base_names) - 1) / 2) * width for k in range(len(records))]
        vals = [r["speedup"][b] for r in records]
        bars = ax.bar(xs, vals, width, label=f"vs nn.LSTM ({b})")
        for bar, v in zip(bars, vals):
            ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                        va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(records)))
    ax.set_xticklabels(groups, fontsize=7)
    ax.set_ylabel("speedup (nn.LSTM time / fused_lstm time)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
