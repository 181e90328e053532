#!/usr/bin/env bash
# Download a Hugging Face model and convert it: checkpoints/<repo_id>/model.pth + config.json + tokenizer files.
# Gated repos read the token from $HF_TOKEN (or `hf auth login`). Extra flags go to convert_hf_checkpoint.py.
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    echo "usage: scripts/prepare.sh <repo_id> [convert flags, e.g. --dtype bfloat16]" >&2
    exit 2
fi
repo_id=$1
shift
cd "$(dirname "$0")/.."
python scripts/download.py --repo_id "$repo_id"
python convert_hf_checkpoint.py --checkpoint_dir "checkpoints/$repo_id" "$@"
