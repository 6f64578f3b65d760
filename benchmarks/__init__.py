"""Benchmarks behind `storymem-rt bench` (installed as `storymem_rt.benchmarks`). Outside the runtime's
import graph: only the CLI's `bench` command imports this package."""
