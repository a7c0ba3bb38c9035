"""The background learner: labels, pairs, exploration, DPO, gate, hot-swap (one cycle: learner/cycle.py)."""
