"""Tools around the service that no serving process loads: benchmark, load test, local cluster, docs."""
