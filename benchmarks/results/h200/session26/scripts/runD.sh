#!/usr/bin/env bash
# Device run D (session 26): compiled 32x8, base and ours in both adapter dtypes, 7 interleaved repeats (phase 1
# only: the process is stopped while PEFT's rows compile; the JSON written after phase 1 holds the rows).
set -u
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
timeout 175 python benchmarks/bench_generate.py --layers 32 --prompt 128 --new-tokens 32 --repeats 7 \
    --configs 32x8 --adapter-dtype both --modes compiled --backends triton --out $OUT/genD_compiled.json > $OUT/genD_compiled.log 2>&1
echo "=== bench rc=$?"
grep -E "^\[" $OUT/genD_compiled.log | tail -n 12
python3 - <<'PY'
import json, os, statistics
d = json.load(open(os.environ["OUT"] + "/genD_compiled.json"))
for r in d["results"]:
    s = r.get("seconds_phase1") or r.get("seconds")
    print(r["row"], r["adapter_dtype"], [round(x, 3) for x in s], "median", round(statistics.median(s), 4))
PY
