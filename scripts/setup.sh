#!/usr/bin/env bash
# Create .venv (Python 3.11) with Slipway's dependencies. CPU torch goes in first so that no other package
# can pull a multi-GB CUDA build; on a GPU machine install the CUDA build of the same torch version instead:
#   TORCH_INDEX_URL=<your PyTorch wheel index for CUDA or CPU> bash scripts/setup.sh
# and, to serve LLMs with vLLM there (serve.engine=vllm): SLIPWAY_EXTRAS=vllm TORCH_INDEX_URL=... bash scripts/setup.sh
# With --test (the README's test command), also Prometheus's Debian package when promtool is missing: the alert
# rules' tests run promtool and a real Prometheus (tests/cluster/test_monitoring_rules.py).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  "") ;;
  --test)
    if ! command -v promtool >/dev/null; then
      SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
      echo "installing Prometheus (the Debian package) for the alert rules' tests"
      $SUDO apt-get update -q
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends prometheus
    fi ;;
  *) echo "scripts/setup.sh: unknown argument ${1}; expected none or --test" >&2; exit 2 ;;
esac

PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip

TORCH_VERSION=$(python - <<'PY'
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(d.split("==")[1] for d in deps if d.startswith("torch==")))
PY
)
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  python -m pip install -q "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"
else
  python -m pip install -q "torch==${TORCH_VERSION}"
fi

# pyproject.toml lists the dependencies; the repo's folders are imported from the root, never installed.
# SLIPWAY_EXTRAS (comma-separated, e.g. vllm on a GPU machine) adds optional groups to the test group.
SLIPWAY_EXTRAS=${SLIPWAY_EXTRAS:-} python - <<'PY' > .venv/requirements.txt
import os
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
groups = ["test"] + [name for name in os.environ["SLIPWAY_EXTRAS"].split(",") if name]
unknown = [name for name in groups if name not in project["optional-dependencies"]]
if unknown:
    raise SystemExit(f"SLIPWAY_EXTRAS: no optional group {unknown} in pyproject.toml "
                     f"(there are {sorted(project['optional-dependencies'])})")
print("\n".join(project["dependencies"] + [dep for name in groups for dep in project["optional-dependencies"][name]]))
PY
python -m pip install -q -r .venv/requirements.txt
# DeepSpeed compiles its shared-memory collective op for CPU runs on first use, which stalls the first ZeRO run on
# a laptop (or the first DeepSpeed test) for about a minute; compile it here instead. GPU accelerators skip this.
python - <<'PY'
from deepspeed.accelerator import get_accelerator
if get_accelerator().device_name() == "cpu":
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and builder.is_compatible():
        print("DeepSpeed's CPU shared-memory op: compiling if not cached (about a minute the first time)", flush=True)
        try:
            builder.load(verbose=False)
        except Exception as error:  # DDP and FSDP runs do not need it: warn, do not fail the install
            print(f"WARNING: could not compile it ({error}); DeepSpeed runs need a C++ compiler and ninja and "
                  "will try again on first use")
PY
python -c "import torch, ray, deepspeed; print('torch', torch.__version__, '| ray', ray.__version__, '| deepspeed', deepspeed.__version__)"
