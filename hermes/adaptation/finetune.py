"""Transfer learning (`hermes finetune`): a trained model -> a model for new data.

The base model's task/modality pools are extended with rows for the new catalog's tasks and
modalities (see :mod:`hermes.adaptation.warm_start`), every other weight is warm-started, and
the model is trained on the new datasets only. The old tasks are not protected: use
`hermes extend` for that. The output is an ordinary model directory whose catalog is the merged
one, so `hermes predict` / `hermes evaluate` work on it unchanged (for new and old tasks).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from hermes.adaptation import engine
from hermes.config import FinetuneConfig
from hermes.data.cache import open_cache
from hermes.data.cache_lock import read_lock
from hermes.errors import ConfigError
from hermes.fileio import atomic_directory, atomic_write_json
from hermes.runtime import choose_device

log = logging.getLogger(__name__)


def run_finetune(
    config: FinetuneConfig,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Fine-tune ``config.base_model`` on ``config.catalog``/``config.cache``; returns the output dir."""
    output = Path(config.output)
    if output.exists() and not overwrite:
        raise ConfigError(f"output {output} exists; choose another folder or pass --overwrite")
    if output.resolve() == Path(config.base_model).resolve():
        raise ConfigError("finetune writes a new model: output must differ from base_model")
    dev = choose_device(device)
    setup = engine.prepare(config, dev)
    data = engine.data_config_for(config, setup.base)
    index = open_cache(config.cache)
    names = [entry.name for entry in setup.train_catalog.datasets]
    cases = engine.choose_cases(index.train_cases(), names, config.max_train_cases, config.seed, str(config.cache))
    batches = engine.make_loader(setup.train_catalog, config.cache, data, cases, config.seed)
    with read_lock(config.cache):  # never read a cache that `hermes prepare` is writing
        result = engine.train(setup.model, batches, config, dev, frozen=setup.frozen, progress=progress)
    bundle = engine.merged_bundle(setup, Path(config.cache), "finetune", config, result, train_cases=cases)
    with atomic_directory(output, overwrite=overwrite) as tmp:
        engine.write_model_dir(tmp, result.model, bundle, setup.catalog)
        atomic_write_json(tmp / "adaptation_log.json", {"history": result.history})
    log.info("fine-tuned model written to %s", output)
    return output
