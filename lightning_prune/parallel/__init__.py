"""Data and model parallelism: collectives, selection over FSDP2 row blocks, sharded checkpoint state."""
