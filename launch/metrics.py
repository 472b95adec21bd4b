"""metrics.csv, TensorBoard and loss.png of a run (written by global rank 0 only): what a user
reads while the run goes and after it ended, kept apart from training so it can change alone."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Optional

CSV_FIELDS = ["step", "tokens", "train_loss", "val_loss", "val_ppl", "lr", "body_lr",
              "grad_norm", "tokens_per_s", "elapsed_s"]


class Metrics:
    """metrics.csv (one row per step; validation columns filled at evaluation steps), optional
    TensorBoard, written by global rank 0 only."""

    def __init__(self, out: Path, active: bool, resume_step: int = 0):
        self.out, self.active = out, active
        self.path = out / "metrics.csv"
        self.rows: list[dict] = []
        self.tb = None
        if not active:
            return
        out.mkdir(parents=True, exist_ok=True)
        if resume_step > 0 and self.path.is_file():
            # keep the history up to the checkpoint; drop steps that will be redone
            with open(self.path, newline="") as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        self._rewrite()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:   # noqa: BLE001 - tensorboard not installed
            self.tb = None

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, CSV_FIELDS)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        if not self.active:
            return
        row = {k: ("" if row.get(k) is None else row[k]) for k in CSV_FIELDS}
        self.rows.append(row)
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, CSV_FIELDS).writerow(row)
        if self.tb is not None:
            for k in ("train_loss", "val_loss", "val_ppl", "lr", "body_lr", "grad_norm",
                      "tokens_per_s"):
                if row[k] != "":
                    self.tb.add_scalar(k, float(row[k]), int(row["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def plot(self, title: str) -> Optional[Path]:
        if not self.active:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        tr = [(int(r["step"]), float(r["train_loss"])) for r in self.rows if r["train_loss"] != ""]
        va = [(int(r["step"]), float(r["val_loss"])) for r in self.rows if r["val_loss"] != ""]
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        if tr:
            ax.plot(*zip(*tr), lw=1.0, alpha=0.85, label="train loss")
        if va:
            ax.plot(*zip(*va), "o-", ms=4, label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats / token)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.out / "loss.png"
        fig.savefig(path)
        plt.close(fig)
        return path

