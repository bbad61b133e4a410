"""Scale-out benchmarks: several replicas behind a router (python -m bench.scale_out.<name>)."""
