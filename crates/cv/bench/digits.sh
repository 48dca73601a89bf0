#!/usr/bin/env bash
# The digits benchmark: our CNN trained and run with tch against the identical network in
# PyTorch, same data split, hyperparameters and thread count, in one run; prints both and
# the ratios (BENCHMARKS.md keeps the numbers).   crates/cv/bench/digits.sh [THREADS]
set -euo pipefail
cd "$(dirname "$0")/../../.."
threads="${1:-2}"
venv="$(ops/setup-torch)"
data="${SUANLI_CV_DATA:-/var/tmp/suanli-cache/cv-data}"
split="$(mktemp)"
ours="$(ops/cargo-torch bench -q -p suanli-cv --features torch --bench digits -- "$data" "$split" "$threads")"
theirs="$("$venv/bin/python" crates/cv/py/bench_digits.py "$data" "$split" "$threads")"
rm -f "$split"
"$venv/bin/python" - "$ours" "$theirs" <<'PY'
import json, statistics, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
med = lambda xs: min(xs[1:] if len(xs) > 1 else xs)  # best epoch after the first (warm-up); noise only adds
rows = [
    ("test accuracy", a["test_accuracy"], b["test_accuracy"], "{:.4f}"),
    ("seconds per epoch (best)", med(a["epoch_seconds"]), med(b["epoch_seconds"]), "{:.3f}"),
    ("inference images/s, batch 1", a["infer_images_per_s_batch1"], b["infer_images_per_s_batch1"], "{:.0f}"),
    ("inference images/s, batch 64", a["infer_images_per_s_batch64"], b["infer_images_per_s_batch64"], "{:.0f}"),
]
print(f"digits: {a['train_images']} train / {a['test_images']} test images, {a['epochs']} epochs, batch {a['batch_size']}, {a['threads']} threads, PyTorch {b['version']}")
print(f"{'':32} {'suanli (tch)':>14} {'PyTorch':>14} {'ratio':>8}")
for name, x, y, fmt in rows:
    ratio = (y / x) if "seconds" in name else (x / y)
    print(f"{name:32} {fmt.format(x):>14} {fmt.format(y):>14} {ratio:>7.2f}x")
print(f"{'classify (whole path), batch 64':32} {a['classify_images_per_s_batch64']:>14.0f}")
print("ratio: > 1 means ours is faster (for accuracy: higher)")
PY
