"""Time the default flow run (no flags) and print its test metrics.

    python bench/default_run.py

Runs `python flows/income_flow.py run` in a fresh temporary datastore, then
reads the run's metrics with the Metaflow client. Prints the wall time, the
TabTransformer's and the boosted-tree baseline's test metrics from the same
run, and their ratio. Extra arguments are passed to the flow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIME_BUDGET_S = 20 * 60


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="tabmodel-bench-"))
    env = {
        **os.environ,
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(root),
        "TABMODEL_HOME": str(root / "home"),
        "METAFLOW_USER": os.environ.get("METAFLOW_USER", "bench"),
    }
    command = [
        sys.executable,
        str(REPO / "flows" / "income_flow.py"),
        "run",
        *sys.argv[1:],
    ]
    started = time.perf_counter()
    completed = subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        sys.exit(
            f"flow run failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
        )

    os.environ.update(env)
    from metaflow import Flow, namespace

    namespace(None)
    run = Flow("IncomeFlow").latest_successful_run
    metrics, baseline = run.data.metrics, run.data.baseline_metrics
    print(
        f"command: {' '.join(['python', 'flows/income_flow.py', 'run', *sys.argv[1:]])}"
    )
    print(f"cpu cores: {os.cpu_count()}")
    print(
        f"wall time: {elapsed:.0f} s ({elapsed / 60:.1f} min), "
        f"{elapsed / TIME_BUDGET_S:.2f} of the 20-minute budget"
    )
    print(
        f"trials: {run.data.trial_totals}, "
        f"best validation PR AUC {run.data.best_value:.4f}"
    )
    print(f"retrain epochs: {run.data.retrain_epochs}")
    for name in ("accuracy", "roc_auc", "pr_auc", "log_loss"):
        print(
            f"{name:9s} tabtransformer={metrics[name]:.4f} gbdt={baseline[name]:.4f} "
            f"ratio={metrics[name] / baseline[name]:.3f}"
        )
    print(
        f"wall_s={elapsed:.0f} roc_auc={metrics['roc_auc']:.4f} "
        f"accuracy={metrics['accuracy']:.4f} gbdt_roc_auc={baseline['roc_auc']:.4f}"
    )


if __name__ == "__main__":
    main()
