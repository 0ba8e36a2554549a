"""Accuracy on a corrupted test set (the Kaggle files or CIFAR-100-C), per corruption and severity: a table on the
terminal, report.json and heatmap.png (corruption × severity).

The mean over all 19 files is what the Kaggle leaderboard computes; the mean over the 15 common corruptions is what
RobustBench reports (known only when the files are named, as CIFAR-100-C's are).
"""
import numpy as np

from training.cifar100c import COMMON_CORRUPTIONS, SEVERITIES
from training.files import save_figure, write_json


def accuracy_report(sources, predicted, labels, clean=None, model=None):
    """The report (a dict) from each source's predicted labels (a list of arrays, in order) and the true labels of
    all rows (one array in submission order). CLEAN: the accuracy on the uncorrupted test set, when measured."""
    table, start = {}, 0
    for source, guesses in zip(sources, predicted):
        truth = labels[start:start + len(guesses)]
        start += len(guesses)
        blocks = np.split(guesses == truth, SEVERITIES)
        table[source.name] = {str(s + 1): float(b.mean()) for s, b in enumerate(blocks)}
        table[source.name]["mean"] = float((guesses == truth).mean())
    common = [table[name]["mean"] for name in COMMON_CORRUPTIONS if name in table]
    return {"corruptions": table, "mean": float(np.mean([row["mean"] for row in table.values()])),
            "mean_15": float(np.mean(common)) if len(common) == len(COMMON_CORRUPTIONS) else None,
            "clean": clean, "files": len(table), "images": int(start), "model": model}


def table_text(report):
    """The report as a fixed-width table: one row per corruption, one column per severity, then the means."""
    head = f"{'corruption':<20}" + "".join(f"{s:>7}" for s in range(1, SEVERITIES + 1)) + f"{'mean':>8}"
    lines = [head, "-" * len(head)]
    for name, row in report["corruptions"].items():
        lines.append(f"{name:<20}" + "".join(f"{row[str(s)]:>7.3f}" for s in range(1, SEVERITIES + 1))
                     + f"{row['mean']:>8.3f}")
    lines.append("-" * len(head))
    lines.append(f"{'mean of ' + str(report['files']) + ' files':<55}{report['mean']:>8.4f}   (the Kaggle score)")
    if report["mean_15"] is not None:
        lines.append(f"{'mean of the 15 common corruptions':<55}{report['mean_15']:>8.4f}   (RobustBench)")
    if report["clean"] is not None:
        lines.append(f"{'clean test set':<55}{report['clean']:>8.4f}")
    return "\n".join(lines)


def write_report(folder, report):
    """FOLDER/report.json and FOLDER/heatmap.png, each written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_json(folder / "report.json", report)
    names = list(report["corruptions"])
    grid = np.array([[report["corruptions"][n][str(s)] for s in range(1, SEVERITIES + 1)] for n in names])
    fig, ax = plt.subplots(figsize=(6.5, 0.36 * len(names) + 1.6))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.6 else "black")
    ax.set_xticks(range(SEVERITIES), [str(s) for s in range(1, SEVERITIES + 1)])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("severity")
    title = f"accuracy: mean {report['mean']:.3f}"
    title += f", 15 common {report['mean_15']:.3f}" if report["mean_15"] is not None else ""
    title += f", clean {report['clean']:.3f}" if report["clean"] is not None else ""
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    save_figure(fig, folder / "heatmap.png")
