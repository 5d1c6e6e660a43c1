"""Data preparation, the first stage: makes sure the configured corpus is on disk.

    demo     -> generate the demo corpus (offline, seconds)
    climbmix -> download data.num_shards ClimbMix shards (parallel, retried, resumable)
    fineweb  -> the same for FineWeb-Edu
    local    -> check the directory holds usable files
"""
from __future__ import annotations

from nanochat.config import ConfigError, data_dir, fill_command
from nanochat.stage import StageContext, stage_main


def main(ctx: StageContext) -> dict:
    from nanochat.dataset import SOURCES, download_shards, list_data_files, shard_indices
    from nanochat.demo_corpus import make_demo_corpus

    cfg = ctx.cfg["data"]
    directory = data_dir(ctx.cfg)
    if ctx.dist.master:
        if cfg["source"] == "demo":
            if not (directory.is_dir() and list_data_files(directory)):
                make_demo_corpus(directory, seed=ctx.cfg["run"]["seed"])
        elif cfg["source"] in SOURCES:
            download_shards(shard_indices(cfg["num_shards"], cfg["source"]), directory, source=cfg["source"],
                            progress=False)
    ctx.barrier()
    files = list_data_files(directory) if directory.is_dir() else []
    if len(files) < 2:
        raise ConfigError(f"{directory} holds {len(files)} data files, need at least 2 (train + validation); "
                          f"{fill_command(ctx.cfg)}")
    nbytes = sum(f.stat().st_size for f in files)
    ctx.events.emit("log", message=f"{len(files)} data files, {nbytes / 1e6:.1f} MB in {directory}")
    return dict(data_dir=str(directory), num_files=len(files), bytes=nbytes, source=cfg["source"])


if __name__ == "__main__":
    stage_main("data", main)
