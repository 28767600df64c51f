"""Evaluation on safety benchmarks: loaders, the generation run, scoring."""
