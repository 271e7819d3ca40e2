#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on the device machine beyond what it has (python 3.12,
# torch, transformers, peft, accelerate, safetensors, tokenizers, numpy, pyyaml, pillow):
# diffusers (the image and Flux models), bitsandbytes (nf4, 8-bit AdamW; it carries
# libbitsandbytes_cuda130.so), pydantic and its three dependencies (lorajobs.jobspecs);
# requests, urllib3 and charset_normalizer, whose metadata diffusers checks at import; and
# huggingface_hub 1.33.0, the one version both diffusers 0.42.1 (>=1.32) and the device's
# transformers 5.17 (<2) accept (it shadows the device's own on PYTHONPATH).
# Run here, from the repository root; the device installs them with
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
# Checked with `python bench/gpu_check.py --tiny`, whose JSON lists every third-party module
# the run imported (`third_party_modules`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
for pkg in \
    diffusers==0.42.1 \
    bitsandbytes==0.50.2 \
    pydantic==2.14.4 \
    pydantic_core==2.50.5 \
    annotated_types==0.8.0 \
    typing_inspection==0.4.5 \
    requests==2.32.5 \
    urllib3==2.8.0 \
    charset_normalizer==3.5.3 \
    huggingface_hub==1.33.0; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$pkg"
done
du -sh .whl
