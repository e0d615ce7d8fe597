"""DDP and FSDP2 machinery: collectives, exact selection across row shards, sharded checkpoint state.

`collectives` keeps masks identical and statistics summed under DDP; `sharded` finds thresholds
across FSDP2's row blocks without moving weights. Pure torch.distributed: no Lightning. A feature's
own sharded variant lives in the feature's package as `sharded.py` (`lora.sharded`,
`recovery.sharded`) and builds on this one.
"""
