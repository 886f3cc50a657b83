#!/usr/bin/env bash
# Render a `miles report` page in headless Chromium and check what a reader would see.
#
# Usage: scripts/check_report_chromium.sh [REPORT_HTML [WORK_DIR]]
#
# Without an argument it first builds a tiny report (FSDD-MNIST, 60 training pairs, 2 epochs,
# joint / joint+aux / miles / unimodal, seeds 0 and 1: about 20 s on one CPU core) in a temporary
# folder. It then takes a screenshot and a DOM dump with Chromium (Debian package `chromium`;
# override the binary with CHROMIUM=..., the Python with PYTHON=...) and asserts that:
#   - the screenshot is not blank: pixel standard deviation and distinct colours above thresholds,
#     and enough strongly coloured pixels (plot lines and bars; the page itself is grey) to show
#     that the embedded plots were decoded and painted;
#   - the rendered DOM holds as many <table> and <img> as the report says it has (its
#     <meta name="miles-report">) and as the HTML file itself, every <img> is a PNG data URI that
#     decodes, and nothing points to an http(s) URL (the page needs no server and no network).
# The page is loaded from file:// with networking features off, so a missing embedded plot cannot
# be fetched from elsewhere and would fail the check. Exit status 0 means every check passed; the
# screenshot (screenshot.png), the DOM dump (dom.html) and Chromium's log stay in WORK_DIR (default:
# a new temporary folder, printed at the end).
set -euo pipefail

CHROMIUM="${CHROMIUM:-chromium}"
PYTHON="${PYTHON:-python3}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
command -v "$CHROMIUM" >/dev/null || { echo "no $CHROMIUM on PATH (apt-get install chromium)" >&2; exit 2; }

work="${2:-$(mktemp -d)}"  # the screenshot, DOM dump and logs stay here to be looked at
mkdir -p "$work"
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT

if [[ $# -ge 1 ]]; then
  [[ -f "$1" ]] || { echo "no report at $1" >&2; exit 2; }
  html="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
else
  echo "building a tiny compare and its report in $work ..."
  "$PYTHON" - "$work" <<'PY'
import dataclasses
import sys
from miles.report.page import build_report
from miles.studies.compare import CompareConfig, run_compare
from miles.studies.config import quiet_base

out = sys.argv[1]
base = dataclasses.replace(quiet_base(epochs=2), dataset_params={"max_train": 60}, latent_dim=8)
config = CompareConfig(
    base=base, methods=["joint", "joint+aux", "miles", "unimodal"],
    fusions=["concat", "sum"], seeds=[0, 1], out_dir=f"{out}/compare",
)
run_compare(config, echo=lambda _m: None)
report = build_report(f"{out}/compare", f"{out}/report")
print(f"report: {len(report.tables)} tables, {len(report.figures)} figures")
PY
  html="$work/report/report.html"
fi
[[ -f "$html" ]] || { echo "no report at $html" >&2; exit 2; }

shot="$work/screenshot.png"
dom="$work/dom.html"
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
       --disable-background-networking --disable-component-update --disable-sync
       --disable-dev-shm-usage --hide-scrollbars --user-data-dir="$profile")
# One launch gives both the DOM (stdout) and the screenshot; a Chromium that does only one action
# per launch gets a second launch for the screenshot.
timeout 120 "$CHROMIUM" "${flags[@]}" --dump-dom --screenshot="$shot" --window-size=1280,2000 \
  "file://$html" >"$dom" 2>"$work/chromium.log" || { cat "$work/chromium.log" >&2; exit 1; }
if [[ ! -s "$shot" ]]; then
  timeout 120 "$CHROMIUM" "${flags[@]}" --screenshot="$shot" --window-size=1280,2000 \
    "file://$html" >>"$work/chromium.log" 2>&1 || { cat "$work/chromium.log" >&2; exit 1; }
fi

"$PYTHON" - "$html" "$dom" "$shot" <<'PY'
import base64
import io
import re
import sys
from html.parser import HTMLParser

import numpy as np
from PIL import Image


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables = 0
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.meta = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables += 1
        elif tag == "img":
            self.imgs.append(a.get("src") or "")
        elif tag == "meta" and a.get("name") == "miles-report":
            self.meta = a.get("content") or ""
        for key in ("href", "src"):
            if key in a and tag != "img":
                self.links.append(a[key] or "")


def parse(path):
    p = Tags()
    text = open(path, encoding="utf-8").read()
    p.feed(text)
    return p, text


html_path, dom_path, shot_path = sys.argv[1:4]
src, _ = parse(html_path)
dom, dom_text = parse(dom_path)
claimed = dict(kv.strip().split("=") for kv in src.meta.split(";"))
n_tables, n_figures = int(claimed["tables"]), int(claimed["figures"])
fails = []
if not (dom.tables == src.tables == n_tables and n_tables > 0):
    fails.append(f"tables: DOM {dom.tables}, file {src.tables}, report says {n_tables}")
if not (len(dom.imgs) == len(src.imgs) == n_figures and n_figures > 0):
    fails.append(f"images: DOM {len(dom.imgs)}, file {len(src.imgs)}, report says {n_figures}")
for i, uri in enumerate(dom.imgs):
    if not uri.startswith("data:image/png;base64,"):
        fails.append(f"img {i} is not an embedded PNG: {uri[:60]!r}")
        continue
    try:
        img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1], validate=True)))
        img.verify()
    except Exception as exc:  # noqa: BLE001 - any decoding error fails the check
        fails.append(f"img {i} does not decode: {exc}")
bad_links = [u for u in dom.links if not u.startswith("#")]
if bad_links:
    fails.append(f"links that leave the page: {bad_links[:5]}")
if re.search(r"https?://", re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", dom_text)):
    fails.append("the page mentions an http(s) URL")

shot = Image.open(shot_path).convert("RGB")
pixels = np.asarray(shot).astype(np.int32)
std = float(pixels.std(axis=(0, 1)).mean())
colours = len(np.unique((pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]))
# The page's own colours are greys (and a few link blues): strongly coloured pixels are plot
# lines, bars and legend patches, so they show that the embedded PNGs were decoded and painted.
coloured = int((pixels.max(axis=2) - pixels.min(axis=2) > 80).sum())
if std < 10:
    fails.append(f"screenshot looks blank: pixel std {std:.1f} < 10")
if colours < 200:
    fails.append(f"screenshot has only {colours} distinct colours (< 200)")
if coloured < 1500:
    fails.append(f"no plot painted in the screenshot: {coloured} coloured pixels (< 1500)")
print(
    f"chromium check: {shot.width}x{shot.height} screenshot, pixel std {std:.1f}, "
    f"{colours} colours, {coloured} coloured pixels; DOM {dom.tables} tables, "
    f"{len(dom.imgs)} <img> (report: {n_tables} tables, {n_figures} figures)"
)
for f in fails:
    print("FAIL:", f)
sys.exit(1 if fails else 0)
PY
echo "OK: $html renders (screenshot $shot)"
