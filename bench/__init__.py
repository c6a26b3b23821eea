"""pykernels benchmark harness: `python -m bench` / `pykernels-bench`."""
