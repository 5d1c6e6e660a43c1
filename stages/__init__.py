"""Pipeline stages, each runnable as `python -m stages.<name>` or under torchrun."""
import os

# Idle OpenMP threads that spin steal the cores busy ones need whenever anything else runs on the
# machine (a data loader, the TUI, another job): measured 1.2-1.5x faster CPU steps under load
# (docs/performance.md). Must be set before torch is imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
