"""Benchmarks behind `make bench`: each module measures one speed ratio against the naive way, in one run."""
