"""The MNN training pipeline (docs/training.md), resumable and crash-safe.

1. Train the switch on the training set less a 10% validation split (fixed seed).
2. Write its softmax over the training set to ``train_probs.safetensors``.
3. Specialist ``e`` starts from the switch's weights (or, with ``specialist_init``, from parameters
   the run's graph hypernetwork ``ghn.safetensors`` predicts for ``specialist_model``, or a random
   init) and trains on the samples whose score for ``e`` exceeds the dataset threshold; each is an
   independent job writing its own file, skipped on resume.

Every file is written to a temporary name and renamed, so a crash never leaves a partial file; every
file is recorded in the run's manifest (``mnn_fast.training.rundir``) and verified before it is reused on
resume or loaded by :func:`load_mnn`. A file that fails verification is retrained (logged) on resume,
and refused by :func:`load_mnn`.
"""
from __future__ import annotations

import collections
import dataclasses
import logging

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .. import io
from . import fields as F
from ..engine.module import MetaNeuralNetwork
from ..engine.routing import normalize_groups, route
from .config import TrainConfig
from .datarecord import check_same_data, read_data_record, reload_splits, save_or_check_data_record
from .data import Splits, cut_training_split, data_source, load_source, validation_split
from .loop import accuracy, binary_group_loss, fit, make_optimizer, predict_probs
from .models import build_model, load_pretrained_resnet
from .rundir import CONFIG_KEY, SWITCH_KEY, RunDir

__all__ = ["train", "initial_switch", "initial_specialist", "load_run_ghn", "config_groups", "data_splits", "cut_training_split", "specialist_subsets", "specialist_classes", "write_probs", "read_probs", "load_mnn", "open_trained_run", "TrainedRun", "run_data", "config_source", "LAUNCHERS"]

# How the specialists are fanned out: worker processes on this machine, Ray tasks, or a Slurm job array.
LAUNCHERS = ("local", "ray", "slurm")

log = logging.getLogger("mnn_fast.training")


def write_probs(path, probs: Tensor, labels: Tensor, metadata: dict[str, str] | None = None) -> str:
    """The switch's training-set probabilities ``Tensor[n, C] float32`` and labels, as safetensors;
    returns the file's sha256."""
    meta = {**(metadata or {}), "kind": "mnn_fast.train_probs"}
    return io.save_tensors(path, {"probs": probs.float(), "labels": labels.long()}, meta)


def read_probs(path) -> tuple[Tensor, Tensor]:
    """``(probs: Tensor[n, C] float32, labels: Tensor[n] int64)`` from :func:`write_probs`.

    ``ValueError`` naming ``path`` for a foreign file, wrong shapes or dtypes, or probabilities that
    are not finite numbers in [0, 1] (a specialist's training set would silently be empty).
    """
    return _checked_probs(path, *io.load_tensors(path))


def _checked_probs(path, tensors: dict, meta: dict) -> tuple[Tensor, Tensor]:
    probs, labels = tensors.get("probs"), tensors.get("labels")
    if meta.get("kind") != "mnn_fast.train_probs" or probs is None or labels is None:
        raise ValueError(f"{path}: not a probability file written by mnn_fast (kind={meta.get('kind')!r})")
    if (probs.dim() != 2 or probs.dtype != torch.float32 or labels.dtype != torch.int64
            or labels.shape != probs.shape[:1]):
        raise ValueError(f"{path}: expected probs [n, C] float32 and labels [n] int64, got {tuple(probs.shape)} "
                         f"{probs.dtype} and {tuple(labels.shape)} {labels.dtype}")
    if not bool(((probs >= 0) & (probs <= 1)).all()):  # NaN fails both comparisons
        raise ValueError(f"{path}: probabilities must be finite numbers in [0, 1]; found NaN or out-of-range values")
    return probs, labels


def config_groups(cfg: TrainConfig, num_classes: int):
    """``cfg.groups`` checked against ``num_classes`` (``None``: one specialist per class)."""
    return normalize_groups(cfg.groups, None, num_classes) if cfg.groups else None


def specialist_classes(groups, num_classes: int) -> list[tuple[int, ...]]:
    """Per expert, the classes it is for: its group, or its own class without groups."""
    return [tuple(g) for g in groups] if groups else [(c,) for c in range(num_classes)]


def specialist_subsets(probs: Tensor, groups, dataset_threshold: float) -> list[Tensor]:
    """Per expert, the training indices whose group score exceeds ``dataset_threshold`` (increasing).

    Exactly the switch function, docs/how-it-works.md with ``t`` = the dataset threshold: the routing engine's expert-major
    ``perm`` split by ``offsets``.
    """
    r = route(probs, groups, threshold=dataset_threshold)
    bounds = r.offsets.tolist()
    return [r.perm[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def data_splits(cfg: TrainConfig, splits: Splits | None = None) -> Splits:
    """``splits`` as given (already cut), else the data ``cfg`` names (:func:`config_source`)."""
    if splits is not None:
        return splits
    return load_source(config_source(cfg), cfg.cache_dir)


def config_source(cfg: TrainConfig) -> dict:
    """The data recipe of ``cfg``: its dataset, cut to ``cfg.train_fraction``; normalisation "auto" is
    ImageNet's with a pretrained switch (what those checkpoints expect), CIFAR's otherwise; one-channel
    images become three for a pretrained (RGB) switch."""
    norm = cfg.normalization if cfg.normalization != "auto" else ("imagenet" if cfg.pretrained else "cifar")
    return data_source(cfg.dataset, cfg.data_path, cfg.seed, norm, cfg.train_fraction, rgb=cfg.pretrained is not None)


def initial_switch(cfg: TrainConfig, splits: Splits) -> nn.Module:
    """The switch of ``cfg`` before training (its architecture, initialised from ``cfg.seed``; not
    the pretrained weights, which :func:`train` loads next)."""
    # Initialised from cfg.seed, not from whatever the global generator holds (which depends on
    # everything the process ran before): the same config trains the same switch every time.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_model(cfg.model, splits.num_classes, splits.input_shape)


def initial_specialist(cfg: TrainConfig, splits: Splits) -> nn.Module:
    """A specialist of ``cfg`` before any weights are loaded (``cfg.specialist_architecture``)."""
    return build_model(cfg.specialist_architecture, splits.num_classes, splits.input_shape)


def _check_ghn_architecture(cfg: TrainConfig, splits: Splits) -> None:
    """Refuses, before any training, a specialist architecture the GHN's graph extractor cannot read."""
    from ..ghn.graph import extract_graph

    if len(splits.input_shape) != 3:
        raise ValueError(f"specialist_init: 'ghn' trains its GHN on CNNs, which need (C, H, W) inputs; this "
                         f"dataset's samples have shape {tuple(splits.input_shape)}")
    try:
        extract_graph(initial_specialist(cfg, splits), splits.input_shape)
    except ValueError as exc:
        raise ValueError(f"specialist_init: 'ghn' cannot read specialist architecture "
                         f"{cfg.specialist_architecture!r} ({exc})") from None


def train(cfg: TrainConfig, run_dir, experts: list[int] | None = None, splits: Splits | None = None, *,
          switch: nn.Module | None = None, ghn: nn.Module | None = None, repair: bool = True, workers: int = 1,
          launcher: str = "local", launcher_options: dict | None = None) -> RunDir:
    """Runs (or resumes) the pipeline in ``run_dir``; ``experts`` limits step 4 to those indices.

    A whole run holds the directory's lock exclusively (a second run is refused at once with
    :class:`io.BusyError`); runs given ``experts`` (job arrays) share it with each other. On resume a
    file is reused only if it verifies (readable, this config, this switch, as the manifest records);
    otherwise it is retrained or recomputed with a warning on the ``mnn_fast.training`` logger, or, with
    ``repair=False``, refused with a ``ValueError``. ``switch``: an already trained switch to adopt
    instead of training one (same architecture as ``cfg.model``). ``ghn``: with ``specialist_init="ghn"``,
    an already trained GHN to adopt instead of training one (:func:`load_run_ghn` of a run of the same
    seed, data and ``ghn_steps``, whatever its specialist architecture). ``workers > 1``: the specialists
    train in that many worker processes (:mod:`mnn_fast.launch.local`). ``launcher="ray"``: the
    specialists are Ray tasks (:mod:`mnn_fast.launch.ray_tasks`; ``launcher_options={"address": ...}``,
    default ``"local"``: an embedded cluster with ``workers`` x ``specialist_threads`` CPUs, or all CPUs
    when ``workers == 1``). ``launcher="slurm"``: one submitit job array (:mod:`mnn_fast.launch.slurm`;
    options ``cluster``, ``partition``, ``timeout_min``; at most ``workers`` tasks at once when
    ``workers > 1``; job files under ``RUN/submitit``). Files are byte-identical to a serial run's
    whichever launcher ran them, since each specialist trains with ``cfg.specialist_threads`` threads
    from its own seed.
    """
    cfg.check()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if experts is not None:
        experts = [F.check_int(f"experts[{i}]", e, 0) for i, e in enumerate(experts)]
    run = RunDir(run_dir)
    splits = data_splits(cfg, splits)
    # Class indices are checked against the data before anything is written: a refused config must
    # leave no config.json behind, or its corrected form would be refused as "a different run".
    groups = config_groups(cfg, splits.num_classes)
    if cfg.specialist_init == "ghn":
        _check_ghn_architecture(cfg, splits)
    run.root.mkdir(parents=True, exist_ok=True)
    config_sha = cfg.config_sha256()
    with run.lock(shared=experts is not None):
        with run.writing():
            _start_run(run, cfg)
            save_or_check_data_record(run, splits)
        train_x, train_y, val_x, val_y = validation_split(splits.train_x, splits.train_y, cfg.val_fraction, cfg.seed)
        with run.writing():
            model, switch_sha = _ensure_switch(run, cfg, splits, (train_x, train_y, val_x, val_y), switch, repair)
            probs = _ensure_probs(run, model, config_sha, switch_sha, train_x, train_y, splits.num_classes, repair)
            ghn_start = (_ensure_ghn(run, cfg, splits, train_x, train_y, ghn, repair)
                         if cfg.specialist_init == "ghn" else None)

        subsets = specialist_subsets(probs, groups, cfg.dataset_threshold)
        classes = specialist_classes(groups, splits.num_classes)
        todo = range(len(subsets)) if experts is None else experts
        jobs = []
        for e in todo:
            if not 0 <= e < len(subsets):
                raise ValueError(f"experts: index {e} out of range for {len(subsets)} specialists")
            path = run.specialist(e)
            try:
                tensors = run.verify(path, config_sha, switch_sha)[0]
                io.load_state_tensors(initial_specialist(cfg, splits), tensors, str(path))
                continue  # finished in an earlier (possibly interrupted) run
            except ValueError as exc:
                _repair_or_refuse(path, exc, repair, f"retraining expert {e}")
            idx = subsets[e]
            # docs/training.md: by default every specialist starts from the switch's weights.
            start = {"switch": model.state_dict, "ghn": lambda: ghn_start,
                     "random": lambda: _random_start(cfg, splits, e)}[cfg.specialist_init]()
            jobs.append(SpecialistJob(e, dataclasses.asdict(cfg), start, splits.num_classes,
                                      tuple(splits.input_shape), train_x[idx], train_y[idx], classes[e]))

        def write(job: SpecialistJob, state: dict) -> None:
            path = run.specialist(job.expert)
            sha = io.save_tensors(path, state, {"kind": "mnn_fast.specialist", CONFIG_KEY: config_sha,
                                                SWITCH_KEY: switch_sha, "train_samples": str(len(job.y))})
            run.record(path, state, sha)

        threads, options = cfg.specialist_threads, dict(launcher_options or {})
        if launcher == "ray":
            from ..launch.ray_tasks import run_jobs_ray

            run_jobs_ray(train_specialist, jobs, write, cpus_per_job=threads,
                         num_cpus=workers * threads if workers > 1 else None, desc="specialists", **options)
        elif launcher == "slurm":
            from ..launch.slurm import run_jobs_submitit

            run_jobs_submitit(train_specialist, jobs, write, folder=run.root / "submitit", cpus_per_job=threads,
                              parallelism=workers if workers > 1 else None, desc="specialists", **options)
        elif workers == 1:
            for job in tqdm(jobs, desc="specialists"):
                write(job, train_specialist(job))
        else:
            from ..launch.local import run_jobs

            run_jobs(train_specialist, jobs, workers, write, desc="specialists")
    return run


@dataclasses.dataclass
class SpecialistJob:
    """Everything one specialist's training needs, picklable for a worker process: the config (as a
    dict), the switch's state to start from, the model's shape and its training subset."""

    expert: int
    config: dict
    start: dict
    num_classes: int
    input_shape: tuple
    x: Tensor
    y: Tensor
    classes: tuple = ()  # the classes the specialist is for (its group); what a binary loss targets


def train_specialist(job: SpecialistJob) -> dict:
    """The trained specialist's ``state_dict`` (detached CPU tensors); the one function serial runs and
    worker processes both call, with ``specialist_threads`` intra-op threads, so their bits agree."""
    cfg = TrainConfig.from_dict(job.config, "specialist job")
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.specialist_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            model = build_model(cfg.specialist_architecture, job.num_classes, job.input_shape)
            model.load_state_dict(job.start)
            seed, desc = cfg.seed + 1 + job.expert, f"expert {job.expert}"
            if cfg.specialist_nsn:
                fit_paired(model, job.x, job.y, cfg.specialist_epochs, cfg, seed, desc + " (nsn)")
            else:
                loss_fn = binary_group_loss(job.classes) if cfg.specialist_loss == "binary" else None
                fit(model, job.x, job.y, cfg.specialist_epochs, cfg, seed, desc, loss_fn=loss_fn)
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(before)


def _random_start(cfg: TrainConfig, splits: Splits, expert: int) -> dict:
    """Specialist ``expert``'s own random initialisation (the architecture's default init), seeded from
    the config so every launcher starts it alike."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1 + expert)
        return initial_specialist(cfg, splits).state_dict()


def _ensure_ghn(run: RunDir, cfg: TrainConfig, splits: Splits, train_x: Tensor, train_y: Tensor,
                given: nn.Module | None, repair: bool) -> dict:
    """The specialists' GHN-predicted start (a ``state_dict``) from the verified ``ghn.safetensors``,
    else from ``given`` or a GHN trained now on the switch's training split, written there.

    The GHN is trained from ``cfg.seed`` with ``cfg.specialist_threads`` threads, so its bits (and so
    the specialists') are fixed by the config; the specialist architecture is never in its pool.
    """
    from ..ghn import load_ghn, predicted_state, save_ghn, train_ghn_on_data

    config_sha = cfg.config_sha256()
    try:
        run.verify(run.ghn, config_sha)
        ghn, _ = load_ghn(run.ghn)
    except ValueError as exc:
        _repair_or_refuse(run.ghn, exc, repair, "retraining the GHN")
        ghn, info = given, {"adopted": "true"}
        if ghn is None:
            before = torch.get_num_threads()
            torch.set_num_threads(cfg.specialist_threads)
            try:
                ghn, losses = train_ghn_on_data(train_x, train_y, splits.input_shape, splits.num_classes,
                                                steps=cfg.ghn_steps, seed=cfg.seed)
            finally:
                torch.set_num_threads(before)
            info = {"loss_first_last": f"{losses[0]:.4f} {losses[-1]:.4f}"}
        sha = save_ghn(run.ghn, ghn, {"kind": "mnn_fast.ghn", CONFIG_KEY: config_sha, **info})
        run.record(run.ghn, ghn.state_dict(), sha)
    return predicted_state(ghn, initial_specialist(cfg, splits), splits.input_shape)


def load_run_ghn(run_dir) -> nn.Module:
    """The verified GHN of a ``specialist_init="ghn"`` run (``RUN/ghn.safetensors``), in eval mode;
    ``ValueError`` naming the file when it is missing or not this run's."""
    from ..ghn import load_ghn

    run = RunDir(run_dir)
    cfg = TrainConfig.load(run.config)
    run.verify(run.ghn, cfg.config_sha256())
    return load_ghn(run.ghn)[0]


def _repair_or_refuse(path, exc: ValueError, repair: bool, action: str) -> None:
    """A file that exists but fails verification: refused (``repair=False``) or logged and redone."""
    if not path.exists():
        return  # nothing there yet: plain first-time work
    if not repair:
        raise exc
    log.warning("%s; %s", exc, action)


def _start_run(run: RunDir, cfg: TrainConfig) -> None:
    """Writes ``config.json`` and the manifest of a new run, or checks an existing run's against ``cfg``."""
    identity = cfg.identity()
    if run.config.exists():
        saved = TrainConfig.load(run.config).identity()
        if saved != identity:
            diff = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
            raise ValueError(f"run_dir {run.root} holds a different run (fields differ: {diff}); use a new directory")
    manifest = run.read_manifest(required=False)
    if manifest is None:
        # A new run, or one from before manifests: its files fail verification and are redone.
        run.start_manifest(identity)
    elif run.config.exists():
        run.check_config(identity)  # config.json edited after training
    elif manifest["config_sha256"] != cfg.config_sha256():
        raise ValueError(f"run_dir {run.root} holds a different run ({run.manifest.name} records another config); "
                         "use a new directory")
    if not run.config.exists():
        io.save_json(run.config, identity)


def _ensure_switch(run: RunDir, cfg: TrainConfig, splits: Splits, data, given: nn.Module | None, repair: bool):
    """``(switch in eval mode, sha256 of its file)``: the verified file, else trained (or ``given``) and written."""
    train_x, train_y, val_x, val_y = data
    config_sha = cfg.config_sha256()
    model = initial_switch(cfg, splits)
    try:
        tensors, _, sha = run.verify(run.switch, config_sha)
        io.load_state_tensors(model, tensors, str(run.switch))
    except ValueError as exc:
        _repair_or_refuse(run.switch, exc, repair, "retraining the switch")
    else:
        if given is not None and any(not torch.equal(v, tensors[k]) for k, v in given.state_dict().items()):
            raise ValueError(f"{run.switch}: differs from the switch passed to train(); use a new directory")
        return model.eval(), sha
    if given is not None:
        io.load_state_tensors(model, {k: v.detach().cpu() for k, v in given.state_dict().items()}, "switch")
    else:
        if cfg.pretrained:
            load_pretrained_resnet(model, cfg.pretrained)
        fit(model, train_x, train_y, cfg.switch_epochs, cfg, cfg.seed, "switch")
    model.eval()
    sha = io.save_state(run.switch, model, {"kind": "mnn_fast.switch", CONFIG_KEY: config_sha,
                                            "val_accuracy": f"{accuracy(model, val_x, val_y):.6f}"})
    return model, run.record(run.switch, model.state_dict(), sha)


def _ensure_probs(run: RunDir, switch: nn.Module, config_sha: str, switch_sha: str, train_x: Tensor,
                  train_y: Tensor, num_classes: int, repair: bool) -> Tensor:
    """``Tensor[n, C] float32``: the verified probability file's, else recomputed from ``switch`` and written."""
    try:
        probs, labels = _checked_probs(run.probs, *run.verify(run.probs, config_sha, switch_sha)[:2])
        if probs.shape != (len(train_y), num_classes) or not torch.equal(labels, train_y):
            raise ValueError(f"{run.probs}: shape {tuple(probs.shape)} or labels do not match this dataset split "
                             f"(expected [{len(train_y)}, {num_classes}])")
        return probs
    except ValueError as exc:
        _repair_or_refuse(run.probs, exc, repair, "recomputing the probabilities")
    probs = predict_probs(switch, train_x)
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(f"{run.switch}: the switch gives non-finite probabilities on the training set (did its "
                         "training diverge? try a lower lr); refusing to select specialist training sets from them")
    sha = write_probs(run.probs, probs, train_y, {CONFIG_KEY: config_sha, SWITCH_KEY: switch_sha})
    run.record(run.probs, {"probs": probs, "labels": train_y}, sha)
    return probs


def run_data(run_dir, splits: Splits | None = None, *, dataset: str | None = None, data_path=None,
             cache_dir=None) -> Splits:
    """The data ``run_dir`` was trained on: ``splits`` checked against the run's data record, else read
    again from the recorded source, or from ``dataset``/``data_path`` when given (the same recipe
    otherwise: a folder or file that moved). ``ValueError`` in one line for other data, or for a run
    trained on tensors handed over from Python when neither is given."""
    run = RunDir(run_dir)
    cfg = TrainConfig.load(run.config)
    record = read_data_record(run)
    cache_dir = cfg.cache_dir if cache_dir is None else cache_dir
    if splits is None and (dataset is not None or data_path is not None):
        if dataset is None:
            raise ValueError("dataset: a data_path needs its dataset (imagefolder, arrays or cifar10)")
        base = (record or {}).get("source") or config_source(cfg)
        splits = load_source({**base, "dataset": dataset, "data_path": None if data_path is None else str(data_path)},
                             cache_dir)
    if splits is not None:
        check_same_data(run, record, splits)
        return splits
    return data_splits(cfg) if record is None else reload_splits(run, record, cache_dir)


# What building a run's networks needs of its data (a Splits has both fields too).
_DataShape = collections.namedtuple("_DataShape", "num_classes input_shape")


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A trained run directory whose config has been checked (:func:`open_trained_run`): what building
    its networks needs, and each network's file loaded on its own and verified.

    ``data``: the data's ``num_classes`` and ``input_shape`` (the splits when given); ``groups``: the
    config's groups, checked (``None``: one specialist per class).
    """

    run: RunDir
    cfg: TrainConfig
    data: object
    groups: list | None
    num_experts: int

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def missing_specialists(self, experts) -> list[int]:
        """Those of ``experts`` whose file is not there (not trained yet, or not copied to this machine)."""
        return [e for e in experts if not self.run.specialist(e).exists()]

    def load_switch(self) -> tuple[nn.Module, str]:
        """``(switch in eval mode, sha256 of its file)``, verified against the manifest."""
        tensors, _, switch_sha = self.run.verify(self.run.switch, self.cfg.config_sha256())
        switch = io.load_state_tensors(initial_switch(self.cfg, self.data), tensors, str(self.run.switch))
        return switch.eval(), switch_sha

    def load_specialist(self, e: int, switch_sha: str) -> nn.Module:
        """Specialist ``e`` in eval mode, read from its own file only and verified against the manifest
        (this config, the switch file ``switch_sha``, the recorded bytes and tensors)."""
        path = self.run.specialist(e)
        tensors = self.run.verify(path, self.cfg.config_sha256(), switch_sha)[0]
        return io.load_state_tensors(initial_specialist(self.cfg, self.data), tensors, str(path)).eval()


def open_trained_run(run_dir, splits: Splits | None = None) -> TrainedRun:
    """``run_dir``'s config (valid, and the config its manifest records) and data shape, read without
    loading any network or decoding any data; ``splits``, when given, must be the data the run was
    trained on (checked by fingerprint). ``ValueError`` naming the file otherwise."""
    run = RunDir(run_dir)
    cfg = TrainConfig.load(run.config)
    run.check_config(cfg.identity())
    record = read_data_record(run)
    if splits is not None:
        check_same_data(run, record, splits)
    elif record is None:
        splits = data_splits(cfg)  # a run from before data records: its config names its data
    else:  # building the module needs only the data's shape: nothing is decoded
        splits = _DataShape(record["num_classes"], tuple(record["input_shape"]))
    groups = config_groups(cfg, splits.num_classes)
    return TrainedRun(run, cfg, splits, groups, len(groups) if groups else splits.num_classes)


def load_mnn(run_dir, test_threshold: float = 0.25, splits: Splits | None = None, *, process_group=None,
             placement=None, **kwargs):
    """The trained :class:`MetaNeuralNetwork` of ``run_dir`` (every specialist must be finished).

    The data's shape comes from the run's data record, so no data is read; ``splits``, when given,
    must be the data the run was trained on (checked by fingerprint).

    Everything is verified first: ``config.json`` is valid and is the config the manifest records,
    and every file is this run's (config and switch hashes), unchanged since it was recorded, with
    exactly the tensors, shapes and dtypes of the architecture. Otherwise ``ValueError`` naming the file.

    ``process_group``: a ``torch.distributed`` group (``torch.distributed.group.WORLD`` for the
    default one); then every rank reads only the switch and its own specialists' files and gets a
    :class:`mnn_fast.distributed.ExpertParallel` (``placement``: ``E`` rank ids, default contiguous
    blocks); see :func:`mnn_fast.distributed.load_sharded`. ``kwargs`` go to the module.
    """
    if process_group is not None:
        from ..distributed.loading import load_sharded

        return load_sharded(run_dir, process_group, placement=placement, test_threshold=test_threshold,
                            splits=splits, **kwargs)
    if placement is not None:
        raise ValueError("placement: only a sharded load (process_group=...) places specialists on ranks")
    trained = open_trained_run(run_dir, splits)
    missing = trained.missing_specialists(range(trained.num_experts))
    if missing:
        raise ValueError(f"run_dir {trained.run.root}: specialists {missing[:10]} are not trained yet")
    switch, switch_sha = trained.load_switch()
    specialists = [trained.load_specialist(e, switch_sha) for e in range(trained.num_experts)]
    return MetaNeuralNetwork(switch, specialists, groups=trained.cfg.groups, threshold=test_threshold,
                             num_classes=trained.num_classes, **kwargs)


def fit_paired(model: nn.Module, x: Tensor, y: Tensor, epochs: int, cfg: TrainConfig, seed: int, desc: str) -> nn.Module:
    """:func:`~mnn_fast.training.loop.fit` for a detachable specialist: every sub-model's loss each batch,
    gradients paired as the NSN paper does (:func:`mnn_fast.nsn.paired_gradients`), the config's optimizer."""
    from ..nsn.train import paired_gradients

    torch.manual_seed(seed)
    opt = make_optimizer(cfg, model)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), cfg.batch_size):
            idx = order[start: start + cfg.batch_size]
            paired_gradients(model, x[idx], y[idx])
            opt.step()
    return model.eval()

