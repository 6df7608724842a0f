#!/usr/bin/env bash
# Part (b) of benchmarks/device_decode.sh: tok/s against 1, 8, 32 distinct adapters; eager batch 64 / 32 adapters.
exec bash "$(dirname "$0")/device_decode.sh" b
