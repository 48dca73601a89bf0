#!/usr/bin/env python3
"""faiss-cpu on the same vectors as benches/index.rs, at matched recall.

Usage: faiss_compare.py DIR [--target-recall R] [--hnsw-only]

DIR is what `cargo bench -p suanli-search --bench index -- ... --write-vectors DIR` wrote:
base.f32, queries.f32 (raw little-endian f32, unit vectors), truth.u64 (the exact top-k
ids of every query, computed by the Rust bench, so both sides are scored against the same
ground truth), meta.json and ours.json (our row). The target recall defaults to ours.

Measured like ours: build single-threaded (our inserts are sequential), except IVF-PQ's
k-means training, which uses all cores (noted in its row); queries one at a time, one
thread, timed around each `index.search` call (Python call overhead, ~5 µs, included).
Memory is the serialised index size (vectors + graph / codes), a close proxy of RSS.

Prints the Markdown table rows of faiss HNSW (M=16, efConstruction as ours, efSearch the
smallest reaching the target) and IVF-PQ (nlist ≈ 4·sqrt(n), PQ dim/8 × 8 bits, nprobe the
smallest reaching the target; with an exact re-rank of k_factor·k PQ candidates when PQ
alone cannot reach it), then ratios against our row.
"""
import argparse
import json
import math
import os
import sys
import time

import faiss
import numpy as np


def load(d):
    meta = json.load(open(os.path.join(d, "meta.json")))
    dim, k = meta["dim"], meta["k"]
    base = np.fromfile(os.path.join(d, "base.f32"), dtype="<f4").reshape(-1, dim)
    queries = np.fromfile(os.path.join(d, "queries.f32"), dtype="<f4").reshape(-1, dim)
    truth = np.fromfile(os.path.join(d, "truth.u64"), dtype="<u8").reshape(-1, k)
    ours = json.load(open(os.path.join(d, "ours.json")))
    return meta, base, queries, truth, ours


def recall(ids, truth):
    k = truth.shape[1]
    found = sum(len(set(a[:k].tolist()) & set(t.tolist())) for a, t in zip(ids, truth))
    return found / truth.size


def batch_recall(index, queries, truth):
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    _, ids = index.search(queries, truth.shape[1])
    return recall(ids, truth)


def timed_queries(index, queries, truth):
    faiss.omp_set_num_threads(1)
    k = truth.shape[1]
    lat = []
    out = np.empty((len(queries), k), dtype=np.int64)
    t0 = time.perf_counter()
    for i in range(len(queries)):
        t = time.perf_counter()
        _, ids = index.search(queries[i : i + 1], k)
        lat.append((time.perf_counter() - t) * 1e6)
        out[i] = ids[0]
    total = time.perf_counter() - t0
    lat.sort()
    pct = lambda p: lat[min(len(lat) - 1, round((len(lat) - 1) * p))]
    return recall(out, truth), len(queries) / total, pct(0.5), pct(0.99)


def mem_mb(index):
    return len(faiss.serialize_index(index)) / (1024 * 1024)


def row(engine, desc, n, dim, build_s, mem, r, qps, p50, p99):
    return f"| {engine} | {desc} | {n} | {dim} | {build_s:.1f} | {mem:.0f} | {r:.4f} | {qps:.0f} | {p50:.0f} | {p99:.0f} |"


def hnsw(base, queries, truth, m, ef_c, target):
    n, dim = base.shape
    index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_c
    faiss.omp_set_num_threads(1)
    t = time.perf_counter()
    index.add(base)
    build_s = time.perf_counter() - t
    chosen = None
    for ef in [10, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024]:
        index.hnsw.efSearch = ef
        r = batch_recall(index, queries, truth)
        print(f"  faiss HNSW efSearch={ef}: recall {r:.4f}", file=sys.stderr)
        chosen = ef
        if r >= target:
            break
    index.hnsw.efSearch = chosen
    r, qps, p50, p99 = timed_queries(index, queries, truth)
    return row(f"faiss {faiss.__version__}", f"HNSWFlat M={m} efC={ef_c} efS={chosen}", n, dim,
               build_s, mem_mb(index), r, qps, p50, p99), (build_s, mem_mb(index), r, qps)


def ivfpq(base, queries, truth, target):
    n, dim = base.shape
    k = truth.shape[1]
    nlist = 2 ** round(math.log2(max(16, 4 * math.sqrt(n))))
    pq_m = max(1, dim // 8)
    while dim % pq_m:
        pq_m -= 1
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    train = base[np.random.default_rng(0).choice(n, min(n, 256 * nlist), replace=False)]
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    ivf.train(train)
    train_s = time.perf_counter() - t
    faiss.omp_set_num_threads(1)
    t = time.perf_counter()
    ivf.add(base)
    add_s = time.perf_counter() - t
    probes = [p for p in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048] if p <= nlist]
    index, desc, reached = ivf, None, False
    for nprobe in probes:
        ivf.nprobe = nprobe
        r = batch_recall(ivf, queries, truth)
        print(f"  faiss IVF{nlist},PQ{pq_m} nprobe={nprobe}: recall {r:.4f}", file=sys.stderr)
        desc = f"IVF{nlist},PQ{pq_m}x8 nprobe={nprobe}"
        if r >= target:
            reached = True
            break
    if not reached:
        # PQ codes alone cannot separate random neighbours this finely: re-rank the
        # k_factor·k best PQ candidates exactly (keeps the full vectors, like HNSWFlat).
        t = time.perf_counter()
        refine = faiss.IndexRefineFlat(ivf, faiss.swig_ptr(base))
        add_s += time.perf_counter() - t
        index = refine
        for kf in [2, 4, 8, 16, 32, 64]:
            refine.k_factor = kf
            for nprobe in probes:
                ivf.nprobe = nprobe
                r = batch_recall(refine, queries, truth)
                print(f"  faiss IVF{nlist},PQ{pq_m}+refine k_factor={kf} nprobe={nprobe}: recall {r:.4f}", file=sys.stderr)
                desc = f"IVF{nlist},PQ{pq_m}x8 nprobe={nprobe} +RFlat k_factor={kf}"
                if r >= target:
                    reached = True
                    break
            if reached:
                break
    r, qps, p50, p99 = timed_queries(index, queries, truth)
    desc += f" (train {train_s:.1f} s on {os.cpu_count()} cores incl.)"
    return row(f"faiss {faiss.__version__}", desc, n, dim, train_s + add_s, mem_mb(index),
               r, qps, p50, p99), (train_s + add_s, mem_mb(index), r, qps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--target-recall", type=float)
    ap.add_argument("--hnsw-only", action="store_true")
    a = ap.parse_args()
    meta, base, queries, truth, ours = load(a.dir)
    target = a.target_recall if a.target_recall is not None else ours["recall"]
    n, dim = base.shape
    print(f"faiss {faiss.__version__}: n={n} dim={dim} queries={len(queries)} target recall {target:.4f}", file=sys.stderr)
    rows = []
    rows.append(("HNSW", *hnsw(base, queries, truth, ours["m"], ours["ef_construction"], target)))
    if not a.hnsw_only:
        rows.append(("IVF-PQ", *ivfpq(base, queries, truth, target)))
    k = truth.shape[1]
    print(f"| engine | index | n | dim | build s | memory MB | recall@{k} | QPS | p50 µs | p99 µs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(row("suanli-search (usearch)", f"HNSW M={ours['m']} efC={ours['ef_construction']} efS={ours['ef_search']}",
              n, dim, ours["build_s"], ours["memory_mb"], ours["recall"], ours["qps"], ours["p50_us"], ours["p99_us"]))
    for _, line, _ in rows:
        print(line)
    print()
    print("| ours ÷ faiss | build time | memory | QPS |")
    print("|---|---|---|---|")
    for name, _, (b, m, r, q) in rows:
        print(f"| vs {name} (recall {r:.4f}) | {ours['build_s'] / b:.2f}× | {ours['memory_mb'] / m:.2f}× | {ours['qps'] / q:.2f}× |")


if __name__ == "__main__":
    main()
