"""Prepare the data a config names, whatever its kind: token rows for LLMs, click-log rows for rankers."""

from pathlib import Path

from conf.schema import RootConfig


def prepare_data(cfg: RootConfig):
    """PreparedText or PreparedClickLog for `cfg.data`, built once and cached under `paths.data_cache`."""
    cache_root = Path(cfg.paths.data_cache).resolve()
    if cfg.data.kind == "text":
        from datasets.text import prepare_text

        return prepare_text(cfg.data, cache_root=cache_root, max_seq_len=cfg.model.max_seq_len)
    from datasets.clicklog import prepare_clicklog

    return prepare_clicklog(cfg.data, cache_root=cache_root)
