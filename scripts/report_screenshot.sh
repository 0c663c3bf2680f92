#!/usr/bin/env bash
# Screenshot of an lmlab HTML report in headless Chromium, to look at a report without a browser.
# Usage: scripts/report_screenshot.sh REPORT.html OUT.png [WIDTH,HEIGHT]   (default 1200,3000)
# Needs a `chromium` (or $CHROMIUM) binary; --no-sandbox because CI and containers often run as root.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 REPORT.html OUT.png [WIDTH,HEIGHT]" >&2
  exit 2
fi
report=$(realpath "$1")
out=$(realpath -m "$2")
size=${3:-1200,3000}
chromium=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
if [ -z "$chromium" ]; then
  echo "$0: no chromium binary found (install the chromium package or set CHROMIUM=/path/to/chrome)" >&2
  exit 1
fi
[ -f "$report" ] || { echo "$0: no such report: $1" >&2; exit 1; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$chromium" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$profile" \
  --window-size="$size" --screenshot="$out" "file://$report" 2>/dev/null
[ -s "$out" ] || { echo "$0: chromium wrote no screenshot" >&2; exit 1; }
echo "wrote $out"
