"""A plain, dense, single-process implementation of Ember's formulas (docs/EMBER.md),
written independently of ember_ds so tests compare two implementations of the math."""
import torch


class ReferenceEmber:
    """Ember for a list of whole 2-D tables, materialising vhat like the formula reads."""

    def __init__(self, tables, lr=1e-3, beta2=0.999, eps=1e-8, weight_decay=0.0,
                 normalize="rows", global_rows=None):
        self.tables = list(tables)
        self.lr, self.b2, self.eps, self.wd, self.normalize = lr, beta2, eps, weight_decay, normalize
        self.global_rows = global_rows
        self.state = [dict(r=torch.zeros(w.shape[0], dtype=torch.float64),
                           c=torch.zeros(w.shape[1], dtype=torch.float64),
                           s=torch.zeros((), dtype=torch.float64), t=0) for w in self.tables]

    @torch.no_grad()
    def step(self):
        for w, st in zip(self.tables, self.state):
            if w.grad is None:
                continue
            g = w.grad.double()
            V, D = w.shape
            if self.global_rows is not None:
                V = self.global_rows
            q = g * g
            colsum = q.sum(0)
            n_active = max(int((g != 0).any(1).sum()), 1)   # a row is active when any |g| > 0
            st["t"] += 1
            b2 = self.b2
            st["r"] = b2 * st["r"] + (1 - b2) * q.mean(1)
            denom = n_active if self.normalize == "active_rows" else V
            st["c"] = b2 * st["c"] + (1 - b2) * colsum / denom
            st["s"] = b2 * st["s"] + (1 - b2) * colsum.sum() / (V * D)
            bc = 1 - b2 ** st["t"]
            vhat = st["r"][:, None] * st["c"][None, :] / (st["s"].clamp_min(1e-30) * bc)
            new = w.double() * (1 - self.lr * self.wd) - self.lr * g / (vhat.sqrt() + self.eps)
            w.copy_(new.to(w.dtype))
