"""Which strategy runs: `train.distributed` at this world size, or a refusal, never a silent fallback.

Its own module because every strategy module (strategy.py, fsdp.py, zero.py) builds on `strategy.Single`,
and this is the one place that imports them all.
"""

from __future__ import annotations

from deltatune.engine.distributed import Dist
from deltatune.engine.strategy import DDP, Single
from deltatune.errors import ConfigError


def choose(cfg, dist: Dist, prec) -> Single:
    """The strategy `train.distributed` asks for at this world size; a request that cannot run is refused."""
    mode = cfg.train.distributed
    if mode == "auto":
        mode = "ddp" if dist.world > 1 else "single"
    if mode == "fsdp":
        from deltatune.engine.fsdp import FSDP

        return FSDP(dist, cfg, prec)
    if mode == "deepspeed":
        from deltatune.engine.zero import DeepSpeedZero

        return DeepSpeedZero(dist, cfg, prec)
    if mode == "ddp" and dist.world == 1:
        raise ConfigError("train.distributed=ddp needs more than one process (WORLD_SIZE=1). Fix: launch with "
                          "`deltatune train CONFIG --nproc N` (or torchrun), or set train.distributed=auto.")
    return DDP(dist, cfg, prec) if mode == "ddp" else Single(dist, cfg, prec)
