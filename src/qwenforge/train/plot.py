"""The end-of-run pictures: SFT loss, DPO reward margin and evaluation scores per topic (`train`),
and the held-out curves of `heal` and `distill`."""

from __future__ import annotations

from pathlib import Path


def plot_metrics(records: list[dict], path: Path) -> Path:
    """Three panels from metrics.jsonl records; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    topics = list(dict.fromkeys(r["topic"] for r in records if "topic" in r))
    figure, (loss_axis, margin_axis, eval_axis) = plt.subplots(1, 3, figsize=(15, 4))
    for topic in topics:
        sft = [r for r in records if r.get("topic") == topic and r.get("stage") == "sft" and "loss" in r]
        dpo = [r for r in records if r.get("topic") == topic and r.get("stage") == "dpo" and "rewards/margins" in r]
        if sft:
            loss_axis.plot([r["step"] for r in sft], [r["loss"] for r in sft], label=topic)
        if dpo:
            margin_axis.plot([r["step"] for r in dpo], [r["rewards/margins"] for r in dpo], label=topic)
    stages = ("eval-before", "eval-sft", "eval-dpo")
    width = 0.8 / (2 * len(stages))
    for s, stage in enumerate(stages):
        for m, metric in enumerate(("accuracy", "voice")):
            values = []
            for topic in topics:
                found = [r[metric] for r in records if r.get("topic") == topic and r.get("stage") == stage and r.get(metric) is not None]
                values.append(found[-1] if found else 0.0)
            offset = (s * 2 + m) * width
            eval_axis.bar([i + offset for i in range(len(topics))], values, width, label=f"{metric} {stage[5:]}")
    eval_axis.set_xticks([i + 0.4 - width / 2 for i in range(len(topics))], topics)
    eval_axis.set_ylim(0, 1)
    for axis, title in ((loss_axis, "SFT loss"), (margin_axis, "DPO reward margin"), (eval_axis, "evaluation")):
        axis.set_title(title)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    loss_axis.set_xlabel("step")
    margin_axis.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return Path(path)


def plot_curves(path: Path, curves: dict[str, list[dict]], x: str, xlabel: str, panels: dict[str, str], before: dict | None = None, log: bool = False) -> None:
    """One panel per held-out figure (history key -> axis label), one line per curve (a heal phase, the
    distill run) against `x`; `before`, the untrained model's figures, as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels) + 3, 3.5), squeeze=False)
    for axis, (key, label) in zip(axes[0], panels.items()):
        for name, rows in curves.items():
            axis.plot([row[x] for row in rows], [row[key] for row in rows], marker=".", label=name)
        if before is not None:
            axis.axhline(before[key], color="grey", linestyle=":", label="before")
        if log:
            axis.set_yscale("log")
        axis.set_xlabel(xlabel)
        axis.set_ylabel(label)
        if len(curves) > 1 or before is not None:
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
