"""metald's benchmarks (`make bench`); see harness.py for how results are kept."""
