"""Arguments shared by `hermes finetune` and `hermes extend`: a YAML config and/or flags.

Every option can come from ``--config FILE`` (keys of :class:`hermes.config.FinetuneConfig` /
``ExtendConfig``; relative paths are resolved against the file's folder) and flags override it,
so a one-off run needs no YAML and a recorded experiment needs no flags.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from hermes.cli.args import NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT
from hermes.config import deep_merge, read_yaml, validate
from hermes.errors import ConfigError

ConfigT = TypeVar("ConfigT", bound=BaseModel)
PATH_KEYS = ("base_model", "catalog", "cache", "output", "old_cache")


def add_common_arguments(parser: argparse.ArgumentParser, output_required: bool) -> None:
    parser.add_argument("-m", "--model", dest="base_model", type=Path, help="trained model directory to start from")
    parser.add_argument("--catalog", type=Path, help="catalog YAML of the NEW data (merged with the model's)")
    parser.add_argument("--cache", type=Path, help="`hermes prepare` output of that catalog")
    parser.add_argument(
        "-o", "--out", dest="output", type=Path,
        help="output model directory" + ("" if output_required else " (default: replace the base model)"),
    )
    parser.add_argument("--config", type=Path, help="YAML with any option (flags override it)")
    parser.add_argument("--steps", type=POSITIVE_INT, help=f"optimiser steps, {POSITIVE_INT} (default 300)")
    parser.add_argument("--lr", type=POSITIVE_FLOAT, help=f"learning rate, {POSITIVE_FLOAT} (default 1e-3)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, help=f"samples per batch, {POSITIVE_INT} (default: data.batch_size)")
    parser.add_argument("--freeze", choices=["none", "backbone"], help="backbone: train only priors, fusion and heads")
    parser.add_argument(
        "--task-init", choices=["mean", "random", "copy"],
        help="new task tokens: mean of the old pool (default), fresh random, or copy (needs --task-from)",
    )
    parser.add_argument(
        "--task-from", action="append", default=[], metavar="NEW=OLD",
        help="start new task NEW from existing task OLD's tokens (repeatable)",
    )
    parser.add_argument("--datasets", nargs="+", help="datasets of the new catalog to train on (default: all)")
    parser.add_argument(
        "--max-train-cases", type=POSITIVE_INT, help=f"few-shot: at most N training cases per dataset, N {POSITIVE_INT}"
    )
    parser.add_argument("--seed", type=NON_NEGATIVE_INT, help=f"random seed, {NON_NEGATIVE_INT}")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        new, sep, old = item.partition("=")
        if not sep or not new.strip() or not old.strip():
            raise ConfigError(f"{flag} expects NEW=OLD, got {item!r}")
        out[new.strip()] = old.strip()
    return out


def build_config(args: argparse.Namespace, model_type: type[ConfigT], extra: dict[str, Any] | None = None) -> ConfigT:
    """Config file (if any) + flags -> a validated config object."""
    data: dict[str, Any] = {}
    source = "command line"
    if args.config is not None:
        data = read_yaml(args.config)
        base_dir = Path(args.config).resolve().parent
        for key in PATH_KEYS:
            if data.get(key) is not None and not Path(str(data[key])).is_absolute():
                data[key] = str((base_dir / str(data[key])).resolve())
        source = str(args.config)
    flags: dict[str, Any] = {}
    for key in ("base_model", "catalog", "cache", "output", "steps", "freeze", "datasets", "max_train_cases",
                "seed", "precision"):
        value = getattr(args, key, None)
        if value is not None:
            flags[key] = str(value) if isinstance(value, Path) else value
    if args.lr is not None:
        flags["optim"] = {"lr": args.lr}
    warm: dict[str, Any] = {}
    if args.task_init is not None:
        warm["task_init"] = args.task_init
    if args.task_from:
        warm["task_from"] = _pairs(args.task_from, "--task-from")
    if warm:
        flags["warm_start"] = warm
    data = deep_merge(data, flags)
    data = deep_merge(data, extra or {})
    if args.batch_size is not None:
        data.setdefault("data", {})
        if data["data"] is None:
            data["data"] = {}
        data["data"]["batch_size"] = args.batch_size
    missing = [key for key in ("base_model", "catalog", "cache") if not data.get(key)]
    if missing:
        flags_of = {"base_model": "-m/--model", "catalog": "--catalog", "cache": "--cache"}
        raise ConfigError(f"missing {', '.join(flags_of[k] for k in missing)} (or the key in --config)")
    if isinstance(data.get("data"), dict) and "patch_size" not in data["data"]:
        # A partial `data:` section keeps the base model's patch size, not DataConfig's default.
        from hermes.bundle import ModelBundle
        from hermes.errors import ModelError

        with contextlib.suppress(ModelError):  # saved without one: DataConfig's default
            data["data"]["patch_size"] = ModelBundle.load(data["base_model"]).patch_size
    return validate(model_type, data, source)


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s: %(message)s")
