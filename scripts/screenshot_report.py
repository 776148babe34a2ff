"""Screenshot an analysis report (or any local HTML file) with headless Chromium.

    python scripts/screenshot_report.py runs/demo/meta/analysis/report.html [-o report.png]

Chromium runs through ``screenshot_mlflow.screenshot`` with the file's ``file://`` URL (same
flags: throw-away profile, networking, sync, component updates and QUIC off). Browser:
$CHROMIUM, else /usr/bin/chromium (Debian: ``apt-get install -y chromium``), else one on PATH.
Exit status: 0 on success, 2 when the file or the browser is missing or no PNG came out.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

# run as a script, this directory is on sys.path
from screenshot_mlflow import find_chromium, screenshot as screenshot_url

__all__ = ["find_chromium", "screenshot", "main"]


def screenshot(html_path: str | os.PathLike, png_path: str | os.PathLike, width: int = 1280, height: int = 2400,
               timeout: float = 120.0, browser: str | None = None) -> Path:
    """Render ``html_path`` to ``png_path``; FileNotFoundError when the file or the browser is missing."""
    html = Path(html_path).resolve()
    if not html.is_file():
        raise FileNotFoundError(f"report not found: {html}")
    # a local page with local images: a short virtual-time budget is plenty
    return screenshot_url(html.as_uri(), png_path, width, height, budget_ms=5000, chromium=browser,
                          timeout_s=timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", help="report.html to render")
    ap.add_argument("-o", "--output", help="PNG path (default: next to the report, report.png)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2400)
    args = ap.parse_args(argv)
    out = args.output or str(Path(args.html).with_suffix(".png"))
    try:
        path = screenshot(args.html, out, args.width, args.height)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"screenshot_report: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
