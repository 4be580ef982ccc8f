"""What shadow traffic costs the clients: ranker latency with every request mirrored to a shadow version against
none mirrored, on one local Ray.

    python scripts/bench_shadow.py                              # about 3 minutes
    python scripts/bench_shadow.py --seconds 3 --rounds 1       # a smoke run

A random dlrm_small ranker (scripts/bench_serve.py builds it) is registered twice, v1 in production and v2 (the
same weights) as the shadow, and served by serve/deploy.py: one production replica and one shadow replica. The
shadow share moves through the registry's alias (stage=shadow), as it would in production, so both settings
run on the same deployment; off and 100% alternate for --rounds rounds at each --concurrency, so that the
machine's drift hits both alike. Printed per setting: requests/s, p50 and p99 of the clients' latency, and the
ratios of 100% to off.

Why the clients can pay at all: the production replica mirrors a request only after it has answered it (one
asyncio task started), and the shadow's own work runs in its own replica. On a machine where the shadow's replica
has its own cores, the added latency is the task start, microseconds. Here the shadow shares the cores with
production, the proxy and the clients, so the ratio also holds the contention for CPU: an upper bound for a
cluster, where the shadow is scheduled apart.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

SHADOW_START_TIMEOUT_S = 300


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="client threads per level")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per setting and round")
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3, help="off/100% pairs per concurrency")
    parser.add_argument("--candidates", type=int, default=64, help="candidates per /v1/rank request")
    parser.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per replica")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "slipway-bench-shadow")
    args = parser.parse_args(argv)
    if min(args.concurrency) < 1 or args.rounds < 1 or args.seconds <= 0:
        parser.error("--concurrency and --rounds must be at least 1, --seconds positive")
    return args


def register(registry_uri: str, scratch: Path) -> str:
    """The random ranker as v1 (production) and again as v2 (the shadow to be)."""
    from scripts.bench_serve import register_random_models
    from serve.registry import RESERVED_EXPORT_NAMES, Registry

    name = register_random_models(registry_uri, scratch=scratch, families={"ranker"})["ranker"]
    registry = Registry(registry_uri)
    copy = scratch / "shadow"
    copy.mkdir()
    for path in registry.fetch(name, 1, cache_dir=scratch / "cache").iterdir():
        if path.name not in RESERVED_EXPORT_NAMES:
            (copy / path.name).write_bytes(path.read_bytes())
    assert registry.register(name, copy, metadata={"family": "ranker", "bench": "shadow"})["version"] == 2
    return name


def set_share(serve_cfg, model: str, percent: float, *, url: str, body: dict) -> None:
    """Move the shadow alias and wait until the replicas follow: with a shadow, until the watcher has seen a
    mirrored answer in the last seconds."""
    from dataclasses import replace

    from scripts.bench_serve import closed_loop
    from serve.endpoint import Endpoint
    from serve.promote import set_shadow

    set_shadow(replace(serve_cfg, shadow_version=2, shadow_percent=percent), model=model)
    time.sleep(3 * serve_cfg.refresh_s + 1)  # followed, then checked (the first check loads the shadow)
    # The shadow deployment scales up from zero replicas when its alias appears: a new replica process, which takes
    # seconds on an idle machine and a minute or more on two cores shared with other Ray jobs.
    started = time.monotonic()
    next_report = started + 30
    while percent and time.monotonic() < started + SHADOW_START_TIMEOUT_S:
        if (2, "shadow") in {(arm["version"], arm["arm"]) for arm in Endpoint(url).summary(window_s=5)["arms"]}:
            return
        closed_loop(serve_cfg.port, "/v1/rank", body, concurrency=1, seconds=1.0, warmup_s=0.0)
        if time.monotonic() > next_report:
            print(f"  waiting for the shadow replica to answer ({time.monotonic() - started:.0f} s)", flush=True)
            next_report += 30
    if percent:
        raise SystemExit(f"the shadow never answered a mirrored request in {SHADOW_START_TIMEOUT_S} s; "
                         "see the Serve logs")


def measure(serve_cfg, model: str, *, url: str, body: dict, args) -> dict:
    from scripts.bench_serve import closed_loop

    results = {}
    for concurrency in args.concurrency:
        for setting in ("off", "100%"):
            results[(concurrency, setting)] = []
        for round_index in range(args.rounds):
            for setting, percent in (("off", 0.0), ("100%", 100.0)):
                set_share(serve_cfg, model, percent, url=url, body=body)
                result = closed_loop(serve_cfg.port, "/v1/rank", body, concurrency=concurrency,
                                     seconds=args.seconds, warmup_s=args.warmup_s)
                results[(concurrency, setting)].append(result)
                print(f"  concurrency {concurrency:>2}, round {round_index + 1}, shadow {setting:>4}: "
                      f"{result.rps:7.1f} req/s  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:7.2f} ms  "
                      f"errors {result.errors}", flush=True)
    return results


def summarize(results: dict, concurrency_levels: list[int]) -> list[dict]:
    rows = []
    for concurrency in concurrency_levels:
        off, on = results[(concurrency, "off")], results[(concurrency, "100%")]
        row = {"concurrency": concurrency}
        for key in ("rps", "p50_ms", "p99_ms"):
            row[f"off_{key}"] = statistics.median(getattr(r, key) for r in off)
            row[f"shadow_{key}"] = statistics.median(getattr(r, key) for r in on)
        row["errors"] = sum(r.errors for r in off + on)
        rows.append(row)
        print(f"concurrency {concurrency}: shadow 100% / off (medians over rounds): p50 "
              f"{row['shadow_p50_ms'] / row['off_p50_ms']:.2f}x ({row['off_p50_ms']:.2f} -> "
              f"{row['shadow_p50_ms']:.2f} ms), p99 {row['shadow_p99_ms'] / row['off_p99_ms']:.2f}x, req/s "
              f"{row['shadow_rps'] / row['off_rps']:.2f}x; errors {row['errors']}", flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    from ray import serve

    from conf.schema import ServeConfig
    from scripts.bench_serve import deploy_app, ranker_request, start_serve
    from serve.registry import Registry

    out = args.out / time.strftime("bench-%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    registry_uri = str(out / "registry")
    model = register(registry_uri, out / "scratch")
    spec = Registry(registry_uri).fetch(model, 1, cache_dir=out / "cache") / "feature_spec.json"
    body = ranker_request(model, spec_path=spec, candidates=args.candidates)
    port = start_serve(cores=2)
    serve_cfg = ServeConfig(registry=registry_uri, port=port, num_cpus=args.num_cpus, min_replicas=1,
                            max_replicas=1, refresh_s=0.5)
    url = deploy_app(serve_cfg, model=model)
    print(f"shadow overhead: {args.rounds} rounds of off and 100% at concurrency {args.concurrency}, "
          f"{args.seconds:g} s each", flush=True)
    try:
        rows = summarize(measure(serve_cfg, model, url=url, body=body, args=args), args.concurrency)
    finally:
        serve.shutdown()
    (out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "levels": rows}, indent=2) + "\n")
    print(f"results: {out / 'results.json'}", flush=True)
    return 0 if all(row["errors"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
