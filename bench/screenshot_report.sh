#!/usr/bin/env bash
# Look at an evaluation report the way a person would: render RUN/eval_last/index.html (written by
# tools/eval_det.py) in headless Chromium and save a full-page screenshot next to it.
#   bash bench/screenshot_report.sh runs/frcnn_demo        # -> runs/frcnn_demo/eval_last/index.png
# Needs Chromium (Debian: apt-get install chromium); it is not a test dependency.
set -euo pipefail
page="$(realpath "${1:?usage: screenshot_report.sh RUN [EVAL_DIR_NAME]}")/${2:-eval_last}/index.html"
[ -f "$page" ] || { echo "no report at $page: run python tools/eval_det.py $1 first" >&2; exit 2; }
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[ -n "$browser" ] || { echo "Chromium not found (Debian: apt-get install chromium)" >&2; exit 2; }
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --window-size=1280,"${HEIGHT:-4000}" --screenshot="${page%.html}.png" "file://$page" 2>/dev/null
echo "${page%.html}.png"
