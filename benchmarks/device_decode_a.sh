#!/usr/bin/env bash
# Part (a) of benchmarks/device_decode.sh: bf16 vs fp32 adapters, batch 32 / 8 adapters, eager and compiled, with profiles.
exec bash "$(dirname "$0")/device_decode.sh" a
