"""Screenshot an analysis report (or any local HTML file) with headless Chromium.

    python scripts/screenshot_report.py runs/demo/meta/analysis/report.html [-o report.png]

Chromium: /usr/bin/chromium (Debian: ``apt-get install -y chromium``), or $CHROMIUM.
Networking, sync, component updates and QUIC are off; a throwaway profile is used.
Exit status: 0 on success, 2 when the file or the browser is missing or no PNG came out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """$CHROMIUM, /usr/bin/chromium, or the first Chromium-like browser on PATH."""
    env = os.environ.get("CHROMIUM")
    if env and Path(env).is_file():
        return env
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(html_path: str | os.PathLike, png_path: str | os.PathLike, width: int = 1280, height: int = 2400,
               timeout: float = 120.0, browser: str | None = None) -> Path:
    """Render ``html_path`` to ``png_path``; FileNotFoundError when the file or the browser is missing."""
    html = Path(html_path).resolve()
    if not html.is_file():
        raise FileNotFoundError(f"report not found: {html}")
    exe = browser or find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found: install it (apt-get install -y chromium) or set $CHROMIUM")
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    if png.exists():
        png.unlink()
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={width},{height}",
               "--hide-scrollbars", html.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return png


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
