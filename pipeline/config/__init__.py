"""The project's configuration, in one package: every section's schema, loading recipes and overrides, the
global batch, the DeepSpeed JSON and the site file.

* :mod:`~pipeline.config.errors`: :class:`ConfigError` (one line: field and what is allowed) and field checks
* :mod:`~pipeline.config.schema`: every section dataclass with its defaults, :class:`TrainConfig`
* :mod:`~pipeline.config.sections`: mapping <-> typed sections (pydantic), ``validate()`` hooks
* :mod:`~pipeline.config.loading`: YAML recipes with ``_base_``, dotted CLI overrides, :func:`load_train_config`
* :mod:`~pipeline.config.recipes`: where recipes are found; ``--model X`` means ``recipes/X.yaml``
* :mod:`~pipeline.config.batch`: global batch -> per-rank micro-batch and accumulation
* :mod:`~pipeline.config.budget`: a budgeted resolution schedule's equal-cost stages and their epochs
* :mod:`~pipeline.config.deepspeed`: the DeepSpeed JSON resolved against the recipe
* :mod:`~pipeline.config.site`: the site file (cluster defaults below the recipe and the command line)
* :mod:`~pipeline.config.extras`: whether the optional extra FFCV is installed (``data.format: ffcv`` needs it)

Nothing here reads training data or touches a process group, so callers validate before doing either.
"""
from pipeline.config.batch import BatchPlan, apply_global_batch, batch_plan, derive_batch
from pipeline.config.deepspeed import (DS_DTYPES, deepspeed_optimizer_section, precision, read_deepspeed_json,
                                       resolve_deepspeed_config)
from pipeline.config.errors import ConfigError, check_choice, check_multiple, check_positive, check_range
from pipeline.config.extras import FFCV_MISSING, ffcv_installed
from pipeline.config.loading import (apply_overrides, deep_merge, load_config, load_train_config, load_yaml,
                                     merge_sources, parse_override)
from pipeline.config.recipes import DEEPSPEED_CONFIGS, RECIPES, ROOT, find_recipe, recipe_for_model
from pipeline.config.schema import (EVAL_RESOLUTIONS, IMAGENET_MEAN, IMAGENET_STD, AugConfig, CheckpointConfig,
                                    DataConfig, EvalConfig, LRScheduleConfig, ModelConfig, OptimConfig,
                                    ResolutionScheduleConfig, RunConfig, ScheduleConfig, TrackingConfig, TrainConfig,
                                    check_auto_augment, check_data_aug, check_peg_positions)
from pipeline.config.sections import flatten, from_dict, to_dict, validate
from pipeline.config.site import SiteConfig, Setting, load_site, pick, site_path, train_defaults

__all__ = [
    "AugConfig", "BatchPlan", "CheckpointConfig", "ConfigError", "DEEPSPEED_CONFIGS", "DS_DTYPES", "DataConfig",
    "EVAL_RESOLUTIONS", "EvalConfig", "FFCV_MISSING", "IMAGENET_MEAN", "IMAGENET_STD", "LRScheduleConfig",
    "ModelConfig",
    "OptimConfig", "RECIPES", "ROOT", "ResolutionScheduleConfig", "RunConfig", "ScheduleConfig", "Setting",
    "SiteConfig", "TrackingConfig", "TrainConfig", "apply_global_batch", "apply_overrides", "batch_plan",
    "check_auto_augment", "check_choice", "check_data_aug", "check_multiple", "check_peg_positions",
    "check_positive", "check_range",
    "deep_merge", "deepspeed_optimizer_section", "derive_batch", "ffcv_installed", "find_recipe", "flatten",
    "from_dict",
    "load_config", "load_site", "load_train_config", "load_yaml", "merge_sources", "parse_override", "pick",
    "precision", "read_deepspeed_json", "recipe_for_model", "resolve_deepspeed_config", "site_path", "to_dict",
    "train_defaults", "validate",
]
