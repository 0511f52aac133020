"""PNG plots of a run's results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import pathlib

from jaxunlearn import records


def plot_phases(results: records.Results, path) -> pathlib.Path:
    """Test accuracy and mean cross-entropy per phase: ensemble, its members, and the baseline.

    Phases followed by deletions are marked with the number of members they invalidated and,
    where measured, the seconds unlearning took vs retraining the ensemble from scratch
    ("base": retraining the baseline from scratch).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [r["phase"] for r in results["phases"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, field, label in ((axes[0], "test_accuracy", "test accuracy"),
                             (axes[1], "test_loss", "test loss (mean cross-entropy)")):
        for r in results["phases"]:
            ys = [m[field] for m in r["members"] if not m.get("shadow")]
            ax.scatter([r["phase"]] * len(ys), ys, s=12, color="tab:blue", alpha=0.35,
                       label="members" if r["phase"] == phases[0] else None)
        ax.plot(phases, [r["ensemble"][field] for r in results["phases"]], "o-",
                color="tab:blue", label=f"ensemble ({results['config']['members']} x "
                                        f"{results['config']['model']})")
        if results["phases"][0]["baseline"] is not None:
            ax.plot(phases, [r["baseline"][field] for r in results["phases"]], "s--",
                    color="tab:orange", label=f"baseline ({results['config']['baseline']})")
        for r in results["phases"]:
            if r["deleted_ids"]:
                ax.axvline(r["phase"] + 0.5, color="grey", lw=0.8, ls=":")
                cost = r.get("cost") or {}
                spent = (f"\n{cost['seconds']:.0f}s vs\n{cost['oracle']['seconds']:.0f}s"
                         if cost.get("seconds") is not None and cost.get("oracle") else "")
                base = ((cost.get("baseline") or {}).get("oracle") or {}).get("seconds")
                spent += f"\nbase {base:.0f}s" if base is not None and spent else ""
                ax.annotate(f"-{len(r['deleted_ids'])} ids\n{len(r['invalidated'])} reset"
                            + spent,
                            (r["phase"] + 0.5, 0.98), xycoords=("data", "axes fraction"),
                            ha="center", va="top", fontsize=7, color="grey")
        ax.set_xlabel("phase")
        ax.set_ylabel(label)
        ax.set_xticks(phases)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    cfg = results["config"]
    fig.suptitle(f"jaxunlearn {cfg['preset']}: {results['n_train']} train / {results['n_test']} "
                 f"test images, seed {cfg['seed']}", fontsize=10)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
