"""Score a served LLM with lm-evaluation-harness on tasks defined locally (task YAML + local data files).

    python scripts/eval_lm.py --base-url http://127.0.0.1:8000 --model llm_sft --registry outputs/registry \
        --include-path scripts/lm_eval_tasks --tasks slipway_choice slipway_qa [--limit 100] \
        [--api-key-env SLIPWAY_API_KEY] [--output outputs/eval/llm_sft.json]

lm-eval's own `local-completions` client sends the requests to <base-url>/v1/completions. It tokenizes with the
served version's tokenizer files, fetched from --registry and checked against their sha256 (or --tokenizer DIR),
so it cuts and scores prompts exactly as the server tokenizes them. Prints a table of task, metric, value and
stderr, and writes lm-eval's results JSON to --output. The library behind it is serve/harness.py.
"""

import argparse
import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import serve.harness as harness  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="the endpoint serve printed, e.g. http://127.0.0.1:8000 "
                        "(with its route prefix, if any)")
    parser.add_argument("--model", required=True, help="the served model's name (serve.model)")
    parser.add_argument("--tasks", nargs="+", required=True, help="task names defined in --include-path")
    parser.add_argument("--include-path", default=str(REPO_ROOT / "scripts" / "lm_eval_tasks"),
                        help="a directory of lm-eval task YAML files (default: the examples in scripts/lm_eval_tasks)")
    parser.add_argument("--registry", help="the registry the endpoint serves from (serve.registry); the served "
                        "version's tokenizer is read from it")
    parser.add_argument("--tokenizer", help="a tokenizer directory to use instead of the served version's")
    parser.add_argument("--cache-dir", default="outputs/registry_cache", help="where a remote registry's files "
                        "are downloaded")
    parser.add_argument("--limit", type=int, help="documents per task (default: all)")
    parser.add_argument("--api-key-env", help="the name of an environment variable holding the endpoint's API key")
    parser.add_argument("--max-length", type=int, help="the model's context (default: read from the tokenizer "
                        "directory)")
    parser.add_argument("--max-gen-toks", type=int, help="tokens a generation task without its own max_gen_toks "
                        "may generate (default: 256, at most half the context)")
    parser.add_argument("--num-concurrent", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--output", default="outputs/eval/results.json", help="where the results JSON goes")
    parser.add_argument("--log-samples", action="store_true", help="keep every document's requests and answers "
                        "in the JSON")
    return parser.parse_args(argv)


def _check_counts(args: argparse.Namespace) -> None:
    for name in ("limit", "max_length", "max_gen_toks", "num_concurrent"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}={value} must be at least 1")


def _tokenizer(args: argparse.Namespace, endpoint: harness.Endpoint, version: int) -> Path:
    if args.tokenizer:
        return Path(args.tokenizer).expanduser().resolve()
    if not args.registry:
        raise ValueError("give --registry (the served version's tokenizer is read from it) or --tokenizer DIR")
    return harness.version_directory(args.registry, endpoint.model, version, cache_dir=Path(args.cache_dir).resolve())


def run(args: argparse.Namespace) -> dict:
    _check_counts(args)
    endpoint = harness.Endpoint(args.base_url, args.model, harness.api_key_from_env(args.api_key_env))
    version = harness.served_version(endpoint)
    tokenizer = _tokenizer(args, endpoint, version)
    print(f"evaluating {endpoint.model} v{version} at {endpoint.completions_url} on {', '.join(args.tasks)} "
          f"(tokenizer {tokenizer})", flush=True)
    results = harness.evaluate_endpoint(endpoint, tasks=args.tasks, include_path=args.include_path,
                                        tokenizer=tokenizer, max_length=args.max_length,
                                        max_gen_toks=args.max_gen_toks, limit=args.limit,
                                        num_concurrent=args.num_concurrent, log_samples=args.log_samples)
    after = harness.served_version(endpoint)
    results["slipway"] = {"model": endpoint.model, "version": version, "base_url": endpoint.root}
    if after != version:
        logging.warning("production moved from v%d to v%d during the evaluation: these scores mix both", version,
                        after)
        results["slipway"]["version_after"] = after
    return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        results = run(args)
    # The registry's errors are ValueErrors too; a missing package is lm-eval's api extra (pip install lm-eval[api]).
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        logging.error("error: %s", err)
        return 2
    path = harness.write_results(results, Path(args.output))
    print(harness.format_results(results))
    print(f"results: {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
