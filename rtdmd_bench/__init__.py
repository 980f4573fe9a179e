"""The top layer of rtdmd-bench: the `rtdmd-bench` command line built from rtdmd's and benchmarks' commands."""
