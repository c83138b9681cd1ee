"""fastprompt benchmark suites: memory, throughput and kernels; `python -m benchmarks.report` renders results."""
