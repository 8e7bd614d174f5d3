"""A trained run directory loaded sharded: each rank reads the switch and only its own specialists' files.

Every rank checks the run's config and the placement, then reads and verifies (against the run's
manifest, as :func:`mnn_fast.training.load_mnn` does) the switch and the specialists the placement
gives it. One small all-gather of a status flag follows, so a rank that failed (a missing file, a
bad placement) makes every rank raise together instead of leaving the others waiting.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.distributed as dist

from ..training.pipeline import open_trained_run
from . import exchange
from .expert_parallel import ExpertParallel
from .placement import check_placement, contiguous_placement

__all__ = ["load_sharded", "read_local_shard", "agree"]


def load_sharded(run_dir, group=None, *, placement=None, test_threshold: float = 0.25, splits=None,
                 **kwargs) -> ExpertParallel:
    """This rank's :class:`ExpertParallel` of the trained run ``run_dir``, reading only its own files.

    Args:
        run_dir: a trained run directory (``mnn-fast train``). This rank needs ``config.json``,
            ``manifest.json``, ``data.json``, ``switch.safetensors`` and its own specialists' files
            (``specialists/expert_NNNN.safetensors``); the others' need not be on this machine.
        group: the process group; ``None`` or ``torch.distributed.group.WORLD`` = the default one.
        placement: ``E`` rank ids (``placement[e]`` holds expert ``e``); ``None`` = contiguous blocks
            (:func:`contiguous_placement`). Every rank must pass the same one.
        test_threshold: the routing threshold, as for ``load_mnn``.
        splits: the run's data, checked by fingerprint when given (not needed: the shape is recorded).
        kwargs: to :class:`ExpertParallel` (``top_k``, ``backend``, ``merge_sources``, ...).

    Every rank must call it. Each check is local and comes before any collective: the run's config,
    the placement against the group's size, this rank's specialist files present, then each file
    verified (config and switch hashes, bytes and tensors as the manifest records). Then every rank
    learns whether any rank failed (one all-gather): the failing rank raises its own one-line
    ``ValueError``, the others a ``RuntimeError`` naming it.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group first")
    if group is dist.group.WORLD:
        group = None
    failure, build = None, None
    try:
        build = read_local_shard(run_dir, group, placement=placement, test_threshold=test_threshold, splits=splits,
                                 **kwargs)
    except Exception as exc:  # noqa: BLE001 -- raised below, once every rank knows
        failure = exc
    agree(failure, group, "loading the run")
    return build()


def agree(failure: BaseException | None, group=None, stage: str = "") -> None:
    """Every rank of ``group`` says whether it failed (one all-gather of a flag); raises ``failure``
    on the rank that had it and a :class:`RankFailure` (a ``RuntimeError``) naming the failed ranks on
    the others."""
    device = exchange.control_device(group)
    flags = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(flags, torch.tensor([int(failure is not None)], device=device), group=group)
    exchange.raise_failures([int(f.item()) for f in flags], failure, "set-up", stage)


def read_local_shard(run_dir, group=None, *, placement=None, test_threshold: float = 0.25, splits=None,
                     **kwargs) -> Callable[[], ExpertParallel]:
    """:func:`load_sharded`'s reading and checks, without its agreement: no collective at all, so a
    caller can do more of its own local work first and then call :func:`agree` once for all of it.

    Returns the function that builds the :class:`ExpertParallel`, to call once every rank agreed:
    building one registers it with the group (ranks number their instances alike), so either every
    rank builds it or none does."""
    trained = open_trained_run(run_dir, splits)
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    placement = check_placement(contiguous_placement(trained.num_experts, world_size) if placement is None
                                else placement, trained.num_experts, world_size)
    mine = [e for e, r in enumerate(placement) if r == rank]
    missing = trained.missing_specialists(mine)
    if missing:
        raise ValueError(f"run_dir {trained.run.root}: rank {rank} holds specialist(s) {missing[:10]} but "
                         f"{trained.run.specialist(missing[0]).name}{' ...' if len(missing) > 1 else ''} is not "
                         f"there (not trained yet, or not copied to this machine)")
    switch, switch_sha = trained.load_switch()
    specialists = {e: trained.load_specialist(e, switch_sha) for e in mine}
    return functools.partial(ExpertParallel, switch, specialists, trained.cfg.groups, test_threshold,
                             num_experts=trained.num_experts, num_classes=trained.num_classes, placement=placement,
                             group=group, **kwargs)
