"""collide's asv benchmark suite (``asv.conf.json``: ``benchmark_dir``); see benchmarks/README.md."""
