#!/usr/bin/env bash
# The device check rehearsed on this CPU, as the GPU machine runs it, so that its first run
# there spends its minutes measuring: Python 3.12, a virtual environment holding what the image
# holds (benchmarks/device_image.txt), the carried wheels fetched for Python 3.12
# (benchmarks/fetch_device_wheels.sh) and installed as on the device (pip --target, then
# PYTHONPATH: device_check.py's setup stage), then every stage's --dry-run, with the real
# check's test selections (the fast tier on 8 CPU devices, the GPU stage's tests).
#     bash benchmarks/rehearse_device_check.sh OUT_DIR    # about 15 minutes on 2 cores
# OUT_DIR/device_check.json and device_check.log are the dry run's; OUT_DIR/image-pip-freeze.txt
# the environment it ran in. Exits non-zero if any stage failed.
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:?usage: bash benchmarks/rehearse_device_check.sh OUT_DIR}")"
mkdir -p "$out"
python="$(.ci/python oldest)" # Python 3.12, the image's; OLDEST_PYTHON picks another
image="$out/image-venv"
rm -rf "$image"
"$python" -m venv "$image"
"$image/bin/python" -m pip install -q --upgrade pip
"$image/bin/python" -m pip install -q -r benchmarks/device_image.txt
"$image/bin/python" -m pip freeze > "$out/image-pip-freeze.txt"
bash benchmarks/fetch_device_wheels.sh
# The project itself is not installed on the device: it runs from the checkout, as here.
# The budget is the GPU machine's: here, on a busy CPU, every stage gets time enough to finish.
"$image/bin/python" benchmarks/device_check.py --out "$out" --dry-run --real-tests --budget 1800
"$image/bin/python" - "$out/device_check.json" <<'PY'
import json, sys
results = json.load(open(sys.argv[1]))
stages = {name: results[name] for name in ("setup", "newest_jax", "speed", "time_to_accuracy")}
failed = {name: stage.get("message") for name, stage in stages.items() if stage["status"] != "ok"}
print(f"rehearsal on Python {results['python']}, jax {results['jax_version']}: "
      f"{results['setup']['wheels_installed']} wheels installed; "
      + ", ".join(f"{name} {stage['status']}" for name, stage in stages.items()))
sys.exit(f"rehearsal failed: {failed}" if failed else 0)
PY
