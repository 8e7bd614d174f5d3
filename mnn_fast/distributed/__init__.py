"""Expert-parallel inference over ``torch.distributed``: each rank holds the switch and some specialists.

``ExpertParallel.from_module(mnn)`` on every rank; ``forward`` routes the rank's own batch and
exchanges rows and logits with ``all_to_all``. Placements say which rank holds which expert. A rank
that raises, dies or hangs makes the others raise :class:`RankFailure` naming it.
``load_sharded(run)`` (or ``load_mnn(run, process_group=...)``) reads only a rank's own specialists' files;
``predict(run, nproc=N)`` writes a run's predictions, the same bytes for any ``N``.
"""
from .exchange import RankFailure
from .expert_parallel import ExpertParallel, RemoteSpecialist
from .loading import load_sharded
from .prediction import predict, read_predictions
from .placement import balanced_placement, check_placement, contiguous_placement, experts_by_rank, parameter_counts

__all__ = ["ExpertParallel", "RankFailure", "RemoteSpecialist", "contiguous_placement", "balanced_placement", "check_placement",
           "experts_by_rank", "parameter_counts", "load_sharded", "predict",
           "read_predictions"]
