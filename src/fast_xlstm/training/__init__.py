"""Training at scale: data preparation, packed loading, FSDP2 training, DCP checkpoints, export.

Modules (one job each): `sources` (reading raw files), `prepare` (tokenizing into shards),
`corpus` (the shard format), `chat_format` (SFT conversations -> ids + loss mask), `data` (packed,
resumable, rank-sharded rows), `packing` (document resets via cu_seqlens; the loss), `parallelize`
(process group, fully_shard, activation checkpointing, compile, sharded init/loading), `optim`
(AdamW groups, LR schedule, clipping), `checkpoint` (DCP), `metrics`, `setup` (config -> objects),
`train` (the loop; torchrun entry point), `export` (checkpoint -> hub layout), `cli`.
Nothing here is imported by the rest of the package.
"""
