"""How drift detection behaves on click logs: false alarms on unshifted traffic, and how many rows it takes to
flag a shifted feature. The statistics only, as a replica computes them (serve/profiles.py, serve/drift.py), on
synthetic click logs of conf/data/synthetic_clicks.yaml's shape; no model and no Ray.

    python scripts/bench_drift.py                            # 400,000 rows, about a minute
    python scripts/bench_drift.py --rows 40000 --windows 20  # a smoke run

The reference is built from the held-out split (as stage=promote builds it); "live" rows are drawn from the
training split, which the reference never saw.
  1. false alarms: --windows windows of each --window-rows size; a window alarms when any of the 39 features is
     flagged (PSI >= 0.25 on at least 360 rows). Printed: the share of windows that alarm, the share of
     (window, feature) pairs flagged, and the largest PSI seen.
  2. detection delay: the rows of live traffic, in steps of --step rows, until a dense feature shifted by each
     --shifts amount (in log1p units: counts times e**shift) is flagged, over --repeats runs: median and worst,
     and whether any unshifted feature was flagged along the way.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400_000, help="synthetic rows to generate (10%% held out)")
    parser.add_argument("--windows", type=int, default=200, help="windows per size for the false-alarm rate")
    parser.add_argument("--window-rows", type=int, nargs="+", default=[360, 1000, 5000])
    parser.add_argument("--shifts", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--feature", default="I2", help="the dense feature the delay runs shift")
    parser.add_argument("--step", type=int, default=60, help="rows between two drift checks in the delay runs")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "slipway-bench-drift",
                        help="results.json goes here, and the generated rows (kept for the next run) under data/")
    return parser.parse_args(argv)


def load_splits(rows: int, cache: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (dense, sparse)} of synthetic click logs with conf/data/synthetic_clicks.yaml's vocabularies."""
    from omegaconf import OmegaConf

    from conf.schema import ClickLogDataConfig
    from datasets.clicklog import prepare_clicklog
    from serve.evaluate import held_out_batches

    shape = OmegaConf.load(REPO_ROOT / "conf" / "data" / "synthetic_clicks.yaml")
    cfg = ClickLogDataConfig(rows=rows, cardinalities=list(shape.cardinalities), zipf_exponent=shape.zipf_exponent)
    prepared = prepare_clicklog(cfg, cache_root=cache)
    splits = {}
    for split, directory in (("val", prepared.val_dir), ("train", prepared.train_dir)):
        batches = list(held_out_batches(Path(directory), columns=["dense", "sparse"], rows=0))
        splits[split] = (np.concatenate([b["dense"].numpy() for b in batches]),
                         np.concatenate([b["sparse"].numpy() for b in batches]))
    return splits


def columns(dense: np.ndarray, sparse: np.ndarray) -> tuple[dict, dict]:
    from datasets.click_encoding import CATEGORICAL_NAMES, DENSE_NAMES

    return ({name: dense[:, i] for i, name in enumerate(DENSE_NAMES)},
            {name: sparse[:, i] for i, name in enumerate(CATEGORICAL_NAMES)})


def add_rows(live, dense: np.ndarray, sparse: np.ndarray) -> None:
    numeric, categorical = columns(dense, sparse)
    live.add({**numeric, **categorical})


def window_drift(reference, dense: np.ndarray, sparse: np.ndarray) -> dict:
    from serve.monitoring import profile_drift

    live = reference.empty()
    add_rows(live, dense, sparse)
    return profile_drift(reference, live)


def false_alarms(reference, train, *, sizes: list[int], windows: int, rng) -> list[dict]:
    dense, sparse = train
    results = []
    for size in sizes:
        alarms, flagged, worst = 0, 0, 0.0
        for _ in range(windows):
            rows = rng.choice(len(dense), size=size, replace=False)
            drift = window_drift(reference, dense[rows], sparse[rows])
            flags = [name for name, d in drift.items() if d.drifted]
            alarms += bool(flags)
            flagged += len(flags)
            worst = max(worst, max(d.psi for d in drift.values()))
        results.append({"window_rows": size, "windows": windows, "alarm_rate": alarms / windows,
                        "feature_flag_rate": flagged / (windows * len(drift)), "max_psi": worst})
    return results


def detection_delays(reference, train, *, feature: str, shifts: list[float], step: int, repeats: int,
                     rng) -> list[dict]:
    from datasets.click_encoding import DENSE_NAMES
    from serve.monitoring import profile_drift

    dense, sparse = train
    column = DENSE_NAMES.index(feature)
    limit = min(len(dense), 200 * step)
    results = []
    for shift in shifts:
        delays, others = [], 0
        for _ in range(repeats):
            order = rng.permutation(len(dense))[:limit]
            shifted = dense[order].copy()
            shifted[:, column] = np.maximum(shifted[:, column] + shift, 0.0)
            delay, live = None, reference.empty()
            for rows in range(step, limit + 1, step):  # the rows so far, counted step by step as a replica does
                add_rows(live, shifted[rows - step : rows], sparse[order[rows - step : rows]])
                drift = profile_drift(reference, live)
                others += any(d.drifted for name, d in drift.items() if name != feature)
                if drift[feature].drifted:
                    delay = rows
                    break
            delays.append(delay)
        found = [d for d in delays if d is not None]
        results.append({"shift": shift, "repeats": repeats, "detected": len(found),
                        "median_rows": float(np.median(found)) if found else None,
                        "max_rows": max(found) if found else None, "checks_flagging_another_feature": others})
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    from datasets.click_encoding import CATEGORICAL_NAMES
    from serve.drift import MIN_LIVE_ROWS, PSI_MAJOR
    from serve.profiles import Profile

    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    splits = load_splits(args.rows, args.out / "data")
    numeric, categorical = columns(*splits["val"])
    reference = Profile.reference(numeric=numeric, categorical=categorical)
    print(f"reference: {reference.rows} held-out rows, {len(numeric)} dense features (10 quantile bins), "
          f"{len(CATEGORICAL_NAMES)} categorical (20 most frequent + others); flagged at PSI >= {PSI_MAJOR} on "
          f">= {MIN_LIVE_ROWS} rows; live rows from the training split ({len(splits['train'][0])} rows)")

    alarms = false_alarms(reference, splits["train"], sizes=args.window_rows, windows=args.windows, rng=rng)
    print("\nfalse alarms (unshifted traffic)")
    print(f"{'window rows':>12} {'windows':>8} {'alarm rate':>11} {'feature flag rate':>18} {'max PSI':>8}")
    for row in alarms:
        print(f"{row['window_rows']:>12} {row['windows']:>8} {row['alarm_rate']:>11.3f} "
              f"{row['feature_flag_rate']:>18.4f} {row['max_psi']:>8.3f}")

    delays = detection_delays(reference, splits["train"], feature=args.feature, shifts=args.shifts,
                              step=args.step, repeats=args.repeats, rng=rng)
    print(f"\ndetection delay: rows until {args.feature} shifted by +shift (log1p) is flagged, checked every "
          f"{args.step} rows")
    print(f"{'shift':>6} {'detected':>9} {'median rows':>12} {'max rows':>9} {'checks flagging another':>24}")
    for row in delays:
        median = "-" if row["median_rows"] is None else f"{row['median_rows']:.0f}"
        worst = "-" if row["max_rows"] is None else str(row["max_rows"])
        print(f"{row['shift']:>6.2f} {row['detected']:>4}/{row['repeats']:<4} {median:>12} {worst:>9} "
              f"{row['checks_flagging_another_feature']:>24}")
    results = args.out / "results.json"
    results.write_text(json.dumps({"reference_rows": reference.rows, "false_alarms": alarms, "detection": delays},
                                  indent=2) + "\n")
    print(f"results: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
