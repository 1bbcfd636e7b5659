"""Real training code as people write it, run plain and under gradmagic (see harness.py)."""
