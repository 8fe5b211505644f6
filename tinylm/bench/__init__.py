"""`tinylm bench` and `make bench`: throughput, MFU and memory rows, the plain-GPT baseline, data and sharding cases."""
