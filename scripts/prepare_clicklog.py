"""Prepare click logs ahead of training: a bigger synthetic set for benchmarks, or a Criteo conversion.

    python scripts/prepare_clicklog.py rows=5_000_000
    python scripts/prepare_clicklog.py source=criteo_tsv path=/data/criteo/day_0 rows=null hash_buckets=1000000

Arguments are `key=value` pairs over the click-log data config (conf/data/synthetic_clicks.yaml, or
criteo_tsv.yaml with source=criteo_tsv), plus `cache=DIR` (default outputs/data, the launcher's default
data cache). The prepared directory is keyed by its settings, so a launch with the same data settings
reuses it; the command to run is printed at the end.
"""

import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from conf.schema import ClickLogDataConfig  # noqa: E402
from datasets.clicklog import prepare_clicklog  # noqa: E402

DATA_FILES = {"synthetic": "synthetic_clicks.yaml", "criteo_tsv": "criteo_tsv.yaml"}


def parse_args(argv: list[str]) -> tuple[ClickLogDataConfig, Path, list[str]]:
    """The data config (the group file of the chosen source, then the overrides), the cache and the overrides."""
    for arg in argv:
        if "=" not in arg:
            raise ValueError(f"expected key=value arguments, got {arg!r} (see the docstring: {__file__})")
    pairs = dict(arg.split("=", 1) for arg in argv)
    cache = Path(pairs.pop("cache", "outputs/data"))
    source = pairs.get("source", "synthetic")
    if source not in DATA_FILES:
        raise ValueError(f"source={source!r} is not one of {', '.join(DATA_FILES)}")
    group_file = OmegaConf.load(REPO_ROOT / "conf" / "data" / DATA_FILES[source])
    group_file.pop("defaults", None)
    overrides = [f"{key}={value}" for key, value in pairs.items()]
    # Merging into the typed schema rejects unknown keys and wrong types with the key's name.
    merged = OmegaConf.merge(OmegaConf.structured(ClickLogDataConfig), group_file, OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_object(merged), cache, overrides


def _hydra_value(value) -> str:
    """A value as a Hydra command-line override writes it."""
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(str(item) for item in value) + "]"
    return str(value)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg, cache, overrides = parse_args(sys.argv[1:])
        prepared = prepare_clicklog(cfg, cache_root=cache)
    except (ValueError, FileNotFoundError, OmegaConfBaseException) as err:
        logging.error("error: %s", str(err).splitlines()[0])
        return 2
    print(f"prepared: {prepared.root} ({prepared.train_rows:,} train rows, {prepared.val_rows:,} val rows)")
    if prepared.bayes:
        print(f"Bayes-optimal validation AUC {prepared.bayes['auc']:.4f}, logloss {prepared.bayes['logloss']:.4f}")
    data_group = "" if cfg.source == "synthetic" else " data=criteo_tsv"
    keys = [item.split("=", 1)[0] for item in overrides if not item.startswith("source=")]
    launch_overrides = " ".join(f"data.{key}={_hydra_value(getattr(cfg, key))}" for key in keys)
    print(f"train on it: python launch.py +exp=ranker_dlrm{data_group} {launch_overrides} paths.data_cache={cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
