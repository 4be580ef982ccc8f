"""The config between Hydra and the rest: every group schema registered with Hydra, the plain config a run
derives once (redacted once), and the typed config rebuilt from it the same way on the driver and the workers.

The model, data and strategy groups have one schema per family, kind of data and strategy; they live with
the family (trainers/families/) and strategy (trainers/strategies/) that own them, so registering them
happens here, above conf/.
"""

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conf.derived import SECRET_KEYS
from conf.schema import RootConfig
from trainers.families import all_families, get_family
from trainers.strategies import all_strategies, get_strategy

REDACTED = "<redacted>"
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def register_configs() -> None:
    """Register the schemas that conf/config.yaml and the group files name first in their defaults lists."""
    store = ConfigStore.instance()
    store.store(name="slipway_schema", node=RootConfig)
    for family in all_families().values():
        store.store(group="model", name=f"{family.name}_schema", node=family.model_schema)
        for kind, schema in family.data_schemas.items():
            store.store(group="data", name=f"{kind}_schema", node=schema)
    for spec in all_strategies().values():
        store.store(group="strategy", name=f"{spec.name}_schema", node=spec.schema(name=spec.name))


def compose(overrides: list[str]) -> DictConfig:
    """conf/config.yaml with `overrides`, as `python launch.py OVERRIDES` composes it, outside Hydra's own
    entry point (benchmarks, Serve's application builder)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()  # the schemas must be in Hydra's ConfigStore before composing
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def plain_config(dict_cfg: DictConfig) -> dict:
    """The composed config as plain, resolved data: enums as their names, nothing OmegaConf."""
    return OmegaConf.to_container(dict_cfg, resolve=True, enum_to_str=True)


def redacted(config: dict) -> dict:
    """`config` with every secret replaced: what run directories, W&B and the workers get."""
    copy = {section: dict(values) if isinstance(values, dict) else values for section, values in config.items()}
    for dotted in SECRET_KEYS:  # values that must never reach a file, a log, W&B or a worker
        section, key = dotted.split(".")
        if copy.get(section, {}).get(key):
            copy[section][key] = REDACTED
    return copy


def config_from_dict(config: dict) -> RootConfig:
    """The typed config from a resolved plain dict (the composed config, config.yaml, or what travels to the Ray
    workers), with the schemas its model family, kind of data and strategy name. A value of the wrong type
    or outside its choices is a ValueError naming the key."""
    root = OmegaConf.structured(RootConfig)
    root.model = OmegaConf.structured(get_family(_name(config, "model", "family")).model_schema)
    root.data = OmegaConf.structured(_data_schema(_name(config, "data", "kind")))
    strategy = get_strategy(_name(config, "strategy", "name"))
    root.strategy = OmegaConf.structured(strategy.schema(name=strategy.name))
    try:
        return OmegaConf.to_object(OmegaConf.merge(root, config))
    except OmegaConfBaseException as err:  # e.g. a sweep trial's value of the wrong type for its key
        raise ValueError(str(err).splitlines()[0] + f" (key {err.full_key})") from err


def _name(config: dict, group: str, key: str):
    return (config.get(group) or {}).get(key)


def _data_schema(kind: str) -> type:
    """Chosen by data.kind, not by the family: a mismatch is named by the run's checks, not as unknown keys."""
    schemas = {kind: schema for family in all_families().values() for kind, schema in family.data_schemas.items()}
    if kind not in schemas:
        raise ValueError(f"data.kind={kind!r} is not one of {', '.join(sorted(schemas))}")
    return schemas[kind]
