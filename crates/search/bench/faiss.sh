#!/usr/bin/env bash
# Benchmarks suanli-search (usearch HNSW) and faiss-cpu (HNSW, IVF-PQ) on the same seeded
# random unit vectors, at matched recall@10, and prints the tables side by side with ratios.
#
#   crates/search/bench/faiss.sh [--n 100000] [--dim 512] [--queries 1000] [other bench flags]
#
# faiss-cpu comes from PyPI, into a venv under /var/tmp/suanli-cache/faiss-venv (created on
# first use). Vectors, queries and the exact top-k go to $BENCH_DIR (default a temp dir).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
venv="${FAISS_VENV:-/var/tmp/suanli-cache/faiss-venv}"
dir="${BENCH_DIR:-$(mktemp -d /var/tmp/suanli-bench.XXXXXX)}"

if ! "$venv/bin/python" -c 'import faiss, numpy' 2>/dev/null; then
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet faiss-cpu numpy
fi

args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--n 100000 --dim 512 --queries 1000)

echo "== suanli-search (cargo bench, release) ==" >&2
(cd "$root" && cargo bench -p suanli-search --bench index -- "${args[@]}" --write-vectors "$dir")

echo "== faiss-cpu on the same files ($dir) ==" >&2
"$venv/bin/python" "$here/faiss_compare.py" "$dir"
