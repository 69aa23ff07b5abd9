"""nnU-Net v2 side by side: plan, preprocess, train and predict nnU-Net's ``3d_fullres`` on raw
datasets, and score its test predictions with Hermes' own evaluation.

For every ``--data`` folder (nnU-Net v2 raw layout: dataset.json, imagesTr, labelsTr, imagesTs,
labelsTs) this script

1. links the dataset into ``WORK/nnUNet_raw/<dataset>`` (dataset.json copied, the image and label
   folders symlinked: the raw data is only read);
2. runs nnU-Net's integrity check, fingerprint extraction, default planner (``nnUNetPlans``) and
   ``3d_fullres`` preprocessing through its Python API;
3. trains ``nnUNetTrainer`` with a shortened schedule (a subclass defined here overrides
   ``num_epochs``, ``num_iterations_per_epoch``, ``num_val_iterations_per_epoch`` and can stop
   after the epoch in which ``--train-minutes`` are exceeded) on fold ``all`` (every imagesTr case);
4. predicts imagesTs with ``nnUNetPredictor`` (sliding window, Gaussian weighting, mirroring TTA
   as nnU-Net does by default) from ``checkpoint_final.pth``;
5. scores the predictions against labelsTs with ``hermes.evaluation.evaluate.evaluate_folders``,
   the code path of ``hermes evaluate --pred DIR --ref DIR``, so Dice / NSD / HD95 are computed
   exactly as for Hermes' own models.

Outputs: ``WORK/<dataset>/predictions/``, ``WORK/<dataset>/evaluation/`` (metrics.csv,
summary.json), ``WORK/<dataset>/result.json`` (written last: its presence marks a finished run)
and ``WORK/nnunet_peer.md`` (rebuilt from every ``WORK/*/result.json``). nnU-Net's own folders are
``WORK/nnUNet_raw``, ``WORK/nnUNet_preprocessed`` and ``WORK/nnUNet_results``.

torch.compile is disabled and data augmentation runs in the main process (nnUNet_n_proc_DA=0 by
default), so it runs on a 2-core CPU. Run it single-threaded as:

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/nnunet_peer.py \\
        --data /path/Dataset502_HippocampusMR --work runs/nnunet_peer --epochs 1 --iterations-per-epoch 50
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shlex
import shutil
import sys
import time
import traceback
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIGURATION = "3d_fullres"
PLANS_IDENTIFIER = "nnUNetPlans"
RESULT_FILE = "result.json"
REPORT_FILE = "nnunet_peer.md"
DATASET_FOLDER = re.compile(r"^Dataset(?P<id>\d{3})_(?P<name>[A-Za-z0-9_.\-]+)$")
FOLDS = ("all", "0", "1", "2", "3", "4")
PROGRESS_SECONDS = 60.0  # a progress line at least this often during an epoch
N_PROC_DA = "nnUNet_n_proc_DA"  # augmentation worker processes, read by nnU-Net at each use


class PeerError(Exception):
    """A failure with a message that names the dataset / file concerned."""


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [nnunet_peer] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be an integer >= 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be an integer >= 0")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a number > 0")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train and predict nnU-Net v2 3d_fullres with a shortened schedule and score it with "
        "Hermes' evaluation (see the module docstring / bench/README.md).",
    )
    parser.add_argument("--data", type=Path, nargs="+", required=True, metavar="DIR",
                        help="raw datasets in nnU-Net v2 layout (DatasetNNN_Name folders with imagesTr, labelsTr, "
                        "imagesTs, labelsTs, dataset.json); only read")
    parser.add_argument("--work", type=Path, required=True, help="output folder (nnU-Net's folders and the results)")
    parser.add_argument("--epochs", type=_positive_int, required=True, help="nnU-Net epochs (nnU-Net default 1000)")
    parser.add_argument("--iterations-per-epoch", type=_positive_int, default=250,
                        help="training iterations per epoch (nnU-Net default 250)")
    parser.add_argument("--val-iterations", type=_positive_int, default=1,
                        help="nnU-Net's per-epoch pseudo-Dice iterations (default 1; nnU-Net's 50 only pick "
                        "checkpoint_best, and fold 'all' validates on training cases; predictions use checkpoint_final)")
    parser.add_argument("--train-minutes", type=_positive_float, default=None,
                        help="stop after the epoch in which this many minutes of training wall time are exceeded "
                        "(the poly learning-rate schedule still spans --epochs)")
    parser.add_argument("--fold", default="all", choices=FOLDS,
                        help="nnU-Net fold (default all: train on every imagesTr case); always tested on imagesTs")
    parser.add_argument("--seed", type=_non_negative_int, default=0,
                        help="seeds Python, NumPy and torch before each dataset (nnU-Net itself is not deterministic)")
    parser.add_argument("--threads", type=_positive_int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--processes", type=_positive_int, default=None,
                        help="worker processes of nnU-Net's integrity check, fingerprint and preprocessing "
                        "(default --threads); with 1 they run as one thread in this process (no torch re-import)")
    parser.add_argument("--da-processes", type=_non_negative_int, default=0,
                        help="nnUNet_n_proc_DA: augmentation worker processes (default 0: in the main process)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default cpu")
    parser.add_argument("--no-mirroring", action="store_true",
                        help="predict without nnU-Net's mirroring test-time augmentation (on by default in nnU-Net)")
    parser.add_argument("--final-validation", action="store_true",
                        help="also run nnU-Net's full validation after training (on fold all: every training case; "
                        "slow, timed separately, not part of the comparison)")
    parser.add_argument("--eval-workers", type=_positive_int, default=1, help="scoring processes (default 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace this script's earlier outputs for the datasets given (default: refuse)")
    args = parser.parse_args(argv)
    if args.processes is None:
        args.processes = args.threads
    return args


# ----------------------------------------------------------------------------------------------
# Inputs and outputs (checked before anything heavy is imported or written)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    source: Path
    name: str
    dataset_id: int
    work: Path
    labels: dict[str, Any]
    file_ending: str
    n_train: int
    test_cases: tuple[str, ...]

    @property
    def raw(self) -> Path:
        return self.work / "nnUNet_raw" / self.name

    @property
    def preprocessed(self) -> Path:
        return self.work / "nnUNet_preprocessed" / self.name

    @property
    def results(self) -> Path:
        return self.work / "nnUNet_results" / self.name

    @property
    def out(self) -> Path:
        return self.work / self.name

    def outputs(self) -> list[Path]:
        return [self.raw, self.preprocessed, self.results, self.out]


def _cases(folder: Path, file_ending: str, channel: bool) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(file_ending) and not p.name.startswith("."))
    cases = [n[: -len(file_ending)] for n in names]
    if channel:
        cases = sorted({c[:-5] for c in cases if re.fullmatch(r".+_\d{4}", c)})
    return cases


def inspect_dataset(source: Path, work: Path) -> Job:
    """Check one raw dataset folder; every error names the folder or file at fault."""
    if not source.is_dir():
        raise PeerError(f"{source}: dataset folder not found")
    source = source.resolve()
    match = DATASET_FOLDER.match(source.name)
    if match is None:
        raise PeerError(f"{source}: nnU-Net needs a folder named DatasetNNN_Name (three-digit id), got {source.name!r}")
    meta_path = source / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise PeerError(f"{meta_path}: not found (every nnU-Net raw dataset has one)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PeerError(f"{meta_path}: not readable JSON: {error}") from None
    if not isinstance(meta, dict):
        raise PeerError(f"{meta_path}: expected a JSON object")
    missing = [k for k in ("labels", "channel_names", "file_ending") if k not in meta]
    if missing:
        raise PeerError(f"{meta_path}: lacks {', '.join(missing)}")
    file_ending = str(meta["file_ending"])
    folders = {}
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        folder = source / sub
        if not folder.is_dir():
            raise PeerError(f"{folder}: not found (needed: imagesTr/labelsTr to train, imagesTs/labelsTs to test)")
        folders[sub] = _cases(folder, file_ending, channel=sub.startswith("images"))
        if not folders[sub]:
            raise PeerError(f"{folder}: no {'CASE_0000' if sub.startswith('images') else 'CASE'}{file_ending} files")
    for split in ("Tr", "Ts"):
        images, labels = set(folders[f"images{split}"]), set(folders[f"labels{split}"])
        if images != labels:
            odd = sorted(images ^ labels)
            shown = ", ".join(odd[:5]) + (f" and {len(odd) - 5} more" if len(odd) > 5 else "")
            raise PeerError(f"{source}: images{split} and labels{split} hold different cases ({shown})")
    return Job(source, source.name, int(match.group("id")), work, dict(meta["labels"]), file_ending,
               len(folders["labelsTr"]), tuple(folders["labelsTs"]))


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_jobs(jobs: Sequence[Job], overwrite: bool) -> None:
    """Refuse clashing ids, outputs that overlap the raw data and (without --overwrite) earlier outputs."""
    ids: dict[int, Job] = {}
    for job in jobs:
        if job.dataset_id in ids:
            raise PeerError(f"{job.source} and {ids[job.dataset_id].source}: same nnU-Net dataset id {job.dataset_id:03d}")
        ids[job.dataset_id] = job
    for job in jobs:
        for path in job.outputs():
            for other in jobs:
                if _overlaps(path, other.source):
                    raise PeerError(f"{path}: overlaps the raw dataset {other.source}; choose a --work outside it")
        for base in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            folder = job.work / base
            clash = sorted(p.name for p in folder.glob(f"Dataset{job.dataset_id:03d}_*") if p.name != job.name) \
                if folder.is_dir() else []
            if clash:
                raise PeerError(f"{folder / clash[0]}: has {job.name}'s id {job.dataset_id:03d}; nnU-Net finds datasets "
                                "by id, so remove it or use another --work")
        existing = [p for p in job.outputs() if p.exists() or p.is_symlink()]
        if existing and not overwrite:
            raise PeerError(f"{job.name}: earlier outputs exist ({', '.join(map(str, existing))}); pass --overwrite "
                            "to replace them, or choose another --work")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)  # does not follow the symlinks inside (the raw data stays untouched)


# ----------------------------------------------------------------------------------------------
# nnU-Net
# ----------------------------------------------------------------------------------------------
def configure_environment(args: argparse.Namespace) -> None:
    """nnU-Net reads these when imported (paths, default process counts): set them first."""
    work = args.work.resolve()
    os.environ.update({
        **{name: str(work / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")},
        "nnUNet_compile": "false",
        N_PROC_DA: str(args.da_processes),
        "nnUNet_def_n_proc": str(args.threads),
    })
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if "nnunetv2" in sys.modules:
        log("warning: nnunetv2 was imported before its paths were set; versions that read them at import may "
            "use other folders")


def check_nnunet() -> dict[str, str]:
    from importlib import metadata

    try:
        import dynamic_network_architectures  # noqa: F401
        import nnunetv2  # noqa: F401
    except ImportError as error:
        raise PeerError(f"nnU-Net v2 is not importable ({error}); install nnunetv2==2.8.1 and "
                        "dynamic-network-architectures (see the Makefile)") from None
    import torch

    return {
        "nnunetv2": metadata.version("nnunetv2"),
        "dynamic_network_architectures": metadata.version("dynamic_network_architectures"),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


@contextlib.contextmanager
def in_process_pools(enabled: bool) -> Iterator[None]:
    """Run nnU-Net's spawn pools as thread pools in this process (with one worker each this is the
    same work, minus a fresh interpreter that re-imports torch for every stage)."""
    if not enabled:
        yield
        return
    from multiprocessing.pool import ThreadPool

    import nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor as fingerprint
    import nnunetv2.experiment_planning.verify_dataset_integrity as verify
    import nnunetv2.preprocessing.preprocessors.default_preprocessor as preprocessor
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer

    modules = [fingerprint, verify, preprocessor, trainer]
    saved = [module.multiprocessing for module in modules]
    context = types.SimpleNamespace(Pool=ThreadPool)
    fake = types.SimpleNamespace(get_context=lambda method=None: context)
    for module in modules:
        module.multiprocessing = fake
    try:
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.multiprocessing = original


def make_trainer_class(epochs: int, iterations: int, val_iterations: int, train_seconds: float | None) -> type:
    """``nnUNetTrainer`` with a shortened schedule; everything else (network, loss, augmentation,
    optimiser, poly learning rate over ``epochs``) is nnU-Net's."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    cpu = torch.device("cpu")

    class nnUNetTrainerPeer(nnUNetTrainer):
        # Same signature as the base class: it records its init arguments by inspecting it.
        def __init__(self, plans: dict, configuration: str, fold: int | str, dataset_json: dict,
                     device: torch.device = cpu) -> None:
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = epochs
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = val_iterations
            self.train_seconds = train_seconds
            self.epochs_completed = 0
            self.stopped_by_time = False

        def run_training(self) -> None:
            # nnUNetTrainer.run_training (nnunetv2 2.8.1) plus a progress line and the time limit.
            start = time.perf_counter()
            self.on_train_start()
            for epoch in range(self.current_epoch, self.num_epochs):
                self.on_epoch_start()
                self.on_train_epoch_start()
                train_outputs, shown = [], time.perf_counter()
                for iteration in range(self.num_iterations_per_epoch):
                    train_outputs.append(self.train_step(next(self.dataloader_train)))
                    if time.perf_counter() - shown > PROGRESS_SECONDS:
                        shown = time.perf_counter()
                        log(f"{self.plans_manager.dataset_name}: epoch {epoch + 1}/{self.num_epochs}, iteration "
                            f"{iteration + 1}/{self.num_iterations_per_epoch}, {shown - start:.0f} s of training")
                self.on_train_epoch_end(train_outputs)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    val_outputs = [self.validation_step(next(self.dataloader_val))
                                   for _ in range(self.num_val_iterations_per_epoch)]
                    self.on_validation_epoch_end(val_outputs)
                self.on_epoch_end()
                self.epochs_completed = epoch + 1
                elapsed = time.perf_counter() - start
                loss = self.logger.get_value("train_losses", step=-1)
                log(f"{self.plans_manager.dataset_name}: epoch {epoch + 1}/{self.num_epochs} done, train loss "
                    f"{loss:.4f}, {elapsed:.0f} s of training")
                if self.train_seconds is not None and elapsed > self.train_seconds and epoch + 1 < self.num_epochs:
                    self.stopped_by_time = True
                    log(f"{self.plans_manager.dataset_name}: --train-minutes {self.train_seconds / 60:g} exceeded; "
                        f"stopping after epoch {epoch + 1}")
                    break
            self.on_train_end()

    return nnUNetTrainerPeer


@contextlib.contextmanager
def stage(job: Job, name: str, wall: dict[str, float]) -> Iterator[None]:
    log(f"{job.name}: {name} ...")
    start = time.perf_counter()
    try:
        yield
    except PeerError:
        raise
    except Exception as error:
        traceback.print_exc()
        raise PeerError(f"{job.name}: {name} failed: {type(error).__name__}: {error}") from error
    wall[name] = time.perf_counter() - start
    log(f"{job.name}: {name} done in {wall[name]:.1f} s")


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _link_raw(job: Job) -> None:
    from hermes.fileio import atomic_copy

    job.raw.mkdir(parents=True)
    atomic_copy(job.source / "dataset.json", job.raw / "dataset.json")
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (job.raw / sub).symlink_to(job.source / sub, target_is_directory=True)


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def run_dataset(job: Job, args: argparse.Namespace, versions: dict[str, str]) -> dict[str, Any]:
    import torch

    wall: dict[str, float] = {}
    total_start = time.perf_counter()
    for path in job.outputs():
        _remove(path)
    _link_raw(job)
    device = torch.device(args.device)
    fold: int | str = args.fold if args.fold == "all" else int(args.fold)

    # nnU-Net's planner sets torch's threads to nnUNet_n_proc_DA while it sizes the network (2.8.1:
    # an error with 0); augmentation workers matter only from training on.
    os.environ[N_PROC_DA] = str(args.threads)
    with stage(job, "plan_preprocess", wall), in_process_pools(args.processes == 1):
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprint_dataset,
            plan_experiment_dataset,
            preprocess_dataset,
        )
        from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

        verify_dataset_integrity(str(job.raw), args.processes)
        extract_fingerprint_dataset(job.dataset_id, num_processes=args.processes, check_dataset_integrity=False,
                                    clean=True, verbose=False, show_progress_bar=False)
        _, plans_identifier = plan_experiment_dataset(job.dataset_id)
        if plans_identifier != PLANS_IDENTIFIER:
            raise PeerError(f"{job.name}: nnU-Net planned {plans_identifier!r}, expected {PLANS_IDENTIFIER!r}")
        preprocess_dataset(job.dataset_id, PLANS_IDENTIFIER, configurations=(CONFIGURATION,),
                           num_processes=(args.processes,), verbose=False, show_progress_bar=False)
    plans = _load_json(job.preprocessed / f"{PLANS_IDENTIFIER}.json")
    if CONFIGURATION not in plans.get("configurations", {}):
        raise PeerError(f"{job.preprocessed / PLANS_IDENTIFIER}.json: no {CONFIGURATION} configuration was planned")
    config = plans["configurations"][CONFIGURATION]

    trainer_class = make_trainer_class(args.epochs, args.iterations_per_epoch, args.val_iterations,
                                       None if args.train_minutes is None else args.train_minutes * 60.0)
    os.environ[N_PROC_DA] = str(args.da_processes)
    with stage(job, "training", wall), in_process_pools(args.processes == 1):
        _seed(args.seed)
        trainer_plans = dict(plans, continue_training=False)
        dataset_json = _load_json(job.preprocessed / "dataset.json")
        trainer = trainer_class(plans=trainer_plans, configuration=CONFIGURATION, fold=fold,
                                dataset_json=dataset_json, device=device)
        trainer.run_training()
    model_dir = Path(trainer.output_folder_base)
    checkpoint_path = Path(trainer.output_folder) / "checkpoint_final.pth"
    parameters = sum(p.numel() for p in trainer.network.parameters())
    final_loss = float(trainer.logger.get_value("train_losses", step=-1))
    epochs_completed, stopped_by_time = trainer.epochs_completed, trainer.stopped_by_time
    validation_dice = None
    if args.final_validation:
        with stage(job, "final_validation", wall), in_process_pools(args.processes == 1):
            trainer.perform_actual_validation(False)
        summary_path = Path(trainer.output_folder) / "validation" / "summary.json"
        validation_dice = _load_json(summary_path)["foreground_mean"]["Dice"] if summary_path.is_file() else None
    del trainer

    pred_dir = job.out / "predictions"
    with stage(job, "prediction", wall):
        predict(checkpoint_path, model_dir, trainer_class, job.raw / "imagesTs", pred_dir, device, not args.no_mirroring)
    written = {p.name[: -len(job.file_ending)] for p in pred_dir.glob(f"*{job.file_ending}")}
    missing = sorted(set(job.test_cases) - written)
    if missing:
        raise PeerError(f"{pred_dir}: nnU-Net wrote no prediction for {', '.join(missing[:5])}")

    with stage(job, "scoring", wall):
        scores = score(job, pred_dir, args.eval_workers)
    wall["total"] = time.perf_counter() - total_start

    result = {
        "dataset": job.name,
        "method": f"nnU-Net v2 {CONFIGURATION} ({PLANS_IDENTIFIER}, default planner), nnUNetTrainer with a shortened "
                  "schedule",
        "source": str(job.source),
        "versions": versions,
        "nnunet_version": versions["nnunetv2"],
        "configuration": CONFIGURATION,
        "fold": args.fold,
        "device": str(device),
        "threads": args.threads,
        "processes": args.processes,
        "da_processes": args.da_processes,
        "seed": args.seed,
        "epochs": args.epochs,
        "epochs_completed": epochs_completed,
        "iterations_per_epoch": args.iterations_per_epoch,
        "val_iterations_per_epoch": args.val_iterations,
        "train_minutes": args.train_minutes,
        "stopped_by_time_limit": stopped_by_time,
        "test_time_mirroring": not args.no_mirroring,
        "n_train_cases": job.n_train,
        "n_test_cases": scores["n_cases"],
        "plans": {
            "patch_size": config.get("patch_size"),
            "batch_size": config.get("batch_size"),
            "spacing": config.get("spacing"),
            "median_image_size_in_voxels": config.get("median_image_size_in_voxels"),
            "network": (config.get("architecture") or {}).get("network_class_name"),
            "parameters": parameters,
        },
        "final_train_loss": final_loss,
        "nnunet_validation_dice": validation_dice,
        "metrics": {"mean": scores["mean"], "mean_ci95": scores["mean_ci95"], "tasks": scores["tasks"]},
        "wall_s": {k: round(v, 2) for k, v in wall.items()},
        "evaluation": {
            "folder": str(job.out / "evaluation"),
            "same_as": f"hermes evaluate --pred {shlex.quote(str(pred_dir))} --ref "
                       f"{shlex.quote(str(job.source / 'labelsTs'))}",
        },
        "command": shlex.join([sys.executable, *sys.argv]),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return result


def predict(checkpoint_path: Path, model_dir: Path, trainer_class: type, images: Path, out: Path,
            device: Any, mirroring: bool) -> None:
    """nnUNetPredictor on checkpoint_final, set up as initialize_from_trained_model_folder does; the
    network is built here because nnU-Net looks trainer classes up by name in its own package."""
    # The checkpoint is nnU-Net's own, written by this script's training run; it is still read
    # with the restricted unpickler (weights_only), allowing only the numpy scalar and dtype
    # types nnU-Net's logging stores in it.
    import numpy as np
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    allowed = [np._core.multiarray.scalar, np.dtype, *{type(np.dtype(t)) for t in ("float32", "float64", "int64")}]
    with torch.serialization.safe_globals(allowed):
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    dataset_json = _load_json(model_dir / "dataset.json")
    plans_manager = PlansManager(_load_json(model_dir / "plans.json"))
    configuration_manager = plans_manager.get_configuration(checkpoint["init_args"]["configuration"])
    network = trainer_class.build_network_architecture(
        plans_manager, configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
        enable_deep_supervision=False,
    )
    network.load_state_dict(checkpoint["network_weights"])
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=device.type == "cuda", device=device,
                                verbose=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration_manager, [checkpoint["network_weights"]],
                                    dataset_json, checkpoint["trainer_name"],
                                    checkpoint.get("inference_allowed_mirroring_axes"))
    out.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential(str(images), str(out), save_probabilities=False, overwrite=True)


def score(job: Job, pred_dir: Path, workers: int) -> dict[str, Any]:
    """``hermes evaluate --pred PRED --ref SOURCE/labelsTs``: the same function, the same defaults
    (reference labels from SOURCE/dataset.json, prediction labels from PRED/dataset.json)."""
    from hermes.config import EvaluationConfig
    from hermes.evaluation.evaluate import evaluate_folders, write_outputs

    config = EvaluationConfig(workers=workers)
    pred_labels = pred_dir / "dataset.json" if (pred_dir / "dataset.json").is_file() else None
    result = evaluate_folders(pred_dir, job.source / "labelsTs", pred_labels=pred_labels, dataset=job.name,
                              config=config, progress=False)
    write_outputs(result, job.out / "evaluation", title=f"nnU-Net v2 {CONFIGURATION} on {job.name}")
    print(result.table(), flush=True)
    entry = result.summary["datasets"][job.name]
    tasks = {
        task: {
            "dice": stats["dice"]["mean"], "nsd": stats["nsd"]["mean"], "hd95": stats["hd95"]["mean"],
            "n_cases": stats["n_cases"], "dice_ci95": stats["dice"]["ci95"],
        }
        for task, stats in entry["tasks"].items()
    }
    return {
        "n_cases": entry["n_cases"],
        "mean": {m: entry["mean"][m]["mean"] for m in ("dice", "nsd", "hd95")},
        "mean_ci95": {m: entry["mean"][m]["ci95"] for m in ("dice", "nsd", "hd95")},
        "tasks": tasks,
    }


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _seconds(value: Any) -> str:
    if value is None:
        return "-"
    minutes, seconds = divmod(round(float(value)), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def write_report(work: Path) -> Path:
    """WORK/nnunet_peer.md from every WORK/*/result.json (datasets may be run one at a time)."""
    from hermes.fileio import atomic_write_text

    results = []
    for path in sorted(work.glob(f"*/{RESULT_FILE}")):
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            log(f"warning: {path} skipped in the report: {error}")
    lines = [
        "# nnU-Net v2 side by side",
        "",
        f"nnU-Net v2 `{CONFIGURATION}` (default planner, `nnUNetTrainer` with a shortened schedule, fold `all`), "
        "trained on imagesTr and scored on imagesTs with Hermes' evaluation (`hermes evaluate --pred --ref`: "
        "Dice, NSD at the default tolerance, HD95 in mm). Written by `bench/nnunet_peer.py` from every "
        f"`{work}/*/{RESULT_FILE}`.",
        "",
        "| dataset | task | n | Dice | NSD | HD95 (mm) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for task, t in r["metrics"]["tasks"].items():
            label = task[len(r["dataset"]) + 1:] if task.startswith(r["dataset"] + "/") else task
            lines.append(f"| {r['dataset']} | {label} | {t['n_cases']} | {_fmt(t['dice'])} | {_fmt(t['nsd'])} | "
                         f"{_fmt(t['hd95'], 2)} |")
        m = r["metrics"]["mean"]
        lines.append(f"| **{r['dataset']}** | **mean** | {r['n_test_cases']} | **{_fmt(m['dice'])}** | "
                     f"{_fmt(m['nsd'])} | {_fmt(m['hd95'], 2)} |")
    lines += [
        "",
        "| dataset | epochs done / planned x iterations | patch | batch | device, threads | TTA mirroring | "
        "plan + preprocess | training | prediction | total | nnU-Net |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        w = r["wall_s"]
        patch = "x".join(map(str, r["plans"]["patch_size"] or []))
        lines.append(
            f"| {r['dataset']} | {r['epochs_completed']} / {r['epochs']} x {r['iterations_per_epoch']} | {patch} | "
            f"{r['plans']['batch_size']} | {r['device']}, {r['threads']} | {'yes' if r['test_time_mirroring'] else 'no'} | "
            f"{_seconds(w.get('plan_preprocess'))} | {_seconds(w.get('training'))} | {_seconds(w.get('prediction'))} | "
            f"{_seconds(w.get('total'))} | {r['nnunet_version']} |"
        )
    lines += ["", "Commands:", ""]
    lines += [f"- {r['dataset']} ({r['finished']}): `{r['command']}`" for r in results]
    path = work / REPORT_FILE
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        jobs = [inspect_dataset(Path(folder), args.work.resolve()) for folder in args.data]
        check_jobs(jobs, args.overwrite)
        configure_environment(args)
        versions = check_nnunet()
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            raise PeerError("--device cuda: torch sees no CUDA device")
        torch.set_num_threads(args.threads)
    except PeerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from hermes.fileio import atomic_write_json, json_safe

    log(f"nnU-Net {versions['nnunetv2']}, torch {versions['torch']}, {args.device}, {args.threads} thread(s); "
        f"{args.epochs} epoch(s) x {args.iterations_per_epoch} iterations; datasets: {', '.join(j.name for j in jobs)}")
    failures = []
    for job in jobs:
        try:
            result = run_dataset(job, args, versions)
        except PeerError as error:
            log(f"{job.name}: FAILED")
            failures.append(str(error))
            continue
        except Exception as error:  # outside a stage (e.g. linking the raw data): still name the dataset
            traceback.print_exc()
            log(f"{job.name}: FAILED")
            failures.append(f"{job.name}: {type(error).__name__}: {error}")
            continue
        path = atomic_write_json(job.out / RESULT_FILE, json_safe(result))
        m = result["metrics"]["mean"]
        log(f"{job.name}: mean Dice {_fmt(m['dice'])}, NSD {_fmt(m['nsd'])}, HD95 {_fmt(m['hd95'], 2)} mm over "
            f"{result['n_test_cases']} test cases; wrote {path}")
    report = write_report(args.work.resolve())
    log(f"wrote {report}")
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
