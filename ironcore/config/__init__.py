"""Typed YAML configuration: schema, loading with provenance, validation, dumping.

    from ironcore.config import load_config
    cfg = load_config("example.yaml", ["trainer.micro_batch_size=4"])
    cfg.model.d_model, cfg.trainer.gradient_accumulation_steps

    cfg = validate_config(Config(model=ModelConfig(d_model=64, num_attention_heads=4)))  # built in code
"""

from ironcore.config.dump import to_dict, to_yaml
from ironcore.config.errors import ConfigError
from ironcore.config.loader import load_config, load_config_with_provenance
from ironcore.config.schema import (
    GROUPS,
    Config,
    DataConfig,
    InitConfig,
    ModelConfig,
    OperationConfig,
    OptimConfig,
    ParallelConfig,
    PositionalEmbeddingConfig,
    TrainerConfig,
    UtilsConfig,
)
from ironcore.config.validate import validate_config

__all__ = [
    "Config", "TrainerConfig", "OperationConfig", "ModelConfig", "PositionalEmbeddingConfig", "DataConfig",
    "OptimConfig", "InitConfig", "ParallelConfig", "UtilsConfig", "GROUPS",
    "load_config", "load_config_with_provenance", "validate_config", "ConfigError", "to_dict", "to_yaml",
]
