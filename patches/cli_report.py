"""What ``python -m patches train`` shows and writes after training: the summary table, the training-curves plot
and ``metrics.json``."""
import json
import math
import sys
from pathlib import Path
from typing import Dict, List

#: metrics of the summary table (names without the eval prefix)
SUMMARY_ROWS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                "logps/chosen", "logps/rejected")
#: curves of the plot: (metric in the training log, title)
PLOT_CURVES = (("loss", "SimPO loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"))


def summary_table(before: Dict[str, Dict[str, float]], after: Dict[str, Dict[str, float]]) -> str:
    """Metrics per split before and after training, as an aligned text table."""
    columns = [(split, "before") for split in before] + [(split, "after") for split in after]
    header = ["metric"] + [f"{split} {when}" for split, when in columns]
    rows = [header]
    for name in SUMMARY_ROWS:
        values = [(before if when == "before" else after)[split].get(name, math.nan) for split, when in columns]
        rows.append([name] + [f"{v:.4f}" for v in values])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_training_curves(log_history: List[dict], path: Path) -> None:
    """PNG with the per-step training loss, reward accuracy and reward margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [entry for entry in log_history if "loss" in entry and "step" in entry]
    figure, axes = plt.subplots(1, len(PLOT_CURVES), figsize=(4.2 * len(PLOT_CURVES), 3.4))
    for axis, (name, title) in zip(axes, PLOT_CURVES):
        axis.plot([e["step"] for e in steps], [e.get(name, math.nan) for e in steps], linewidth=1.4)
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(trainer, output_dir: Path, result: Dict, summary: bool = True) -> None:
    """metrics.json, the plot (a warning instead when matplotlib is missing) and, with ``summary``, the summary
    table (an interrupted run ends with one line instead)."""
    (output_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    written = ["model", "metrics.json"]
    plot_path = output_dir / "training_curves.png"
    try:
        plot_training_curves(trainer.state.log_history, plot_path)
        written.append(plot_path.name)
    except ImportError as error:  # the model and metrics are saved: a missing plot must not fail the run
        print(f"warning: skipped {plot_path.name}: matplotlib is not available ({error})", file=sys.stderr)
    if not summary:
        return
    print()
    print(summary_table(result["before"], result["after"]))
    print(f"\n{result['steps']} steps in {result['train_runtime_s']:.1f} s "
          f"(total {result['total_runtime_s']:.1f} s); wrote {output_dir}/ ({', '.join(written)})")

