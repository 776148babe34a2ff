"""Screenshot a page of the MLflow UI (or any URL) with headless Debian Chromium.

    python scripts/screenshot_mlflow.py --out shot.png \
        --url 'http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning'

MLflow 3's UI opens experiments in its GenAI (traces) view unless the URL asks for
``workflowType=machine_learning``; ``experiment_url`` builds such a URL for the runs table.
``--dom-out`` also saves the rendered DOM (a second Chromium pass), so callers can check
which runs the page actually shows. Chromium runs with a throw-away profile, no sandbox (containers), no background
networking, and a virtual-time budget so the single-page app finishes rendering before
the shot. Exits non-zero when Chromium is missing, fails, or writes no image.
This is the one place that runs Chromium: ``screenshot_report.py`` calls ``screenshot``
with a ``file://`` URL.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def experiment_url(server: str, experiment_id: str, search_filter: str | None = None,
                   order_by: str | None = None) -> str:
    """The MLflow UI runs table of an experiment (Model training view), optionally filtered and sorted."""
    from urllib.parse import urlencode

    query = {"workflowType": "machine_learning"}
    if search_filter:
        query["searchFilter"] = search_filter
    if order_by:
        query.update(orderByKey=order_by, orderByAsc="false")
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?{urlencode(query)}"


def find_chromium(explicit: str | None = None) -> str:
    """``explicit``, else $CHROMIUM, else the first of ``CHROMIUM`` found; FileNotFoundError when none is."""
    tried = (explicit,) if explicit else tuple(c for c in (os.environ.get("CHROMIUM"), *CHROMIUM) if c)
    for c in tried:
        path = shutil.which(c)
        if path:
            return path
    raise FileNotFoundError(f"chromium not found (tried {', '.join(tried)}): apt-get install -y chromium "
                            f"or set $CHROMIUM")


def _chromium(exe: str, url: str, action: list[str], width: int, height: int, budget_ms: int,
              timeout_s: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
               f"--window-size={width},{height}", "--hide-scrollbars", *action, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


def screenshot(url: str, out: str | Path, width: int = 1400, height: int = 900, budget_ms: int = 15000,
               chromium: str | None = None, timeout_s: float = 120.0, dom_out: str | Path | None = None) -> Path:
    """Render ``url`` headless and write a PNG to ``out`` (and its DOM to ``dom_out``); returns the PNG path."""
    exe = find_chromium(chromium)
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    proc = _chromium(exe, url, [f"--screenshot={out}"], width, height, budget_ms, timeout_s)
    if proc.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"chromium failed (rc={proc.returncode}) for {url}:\n{proc.stderr[-2000:]}")
    if dom_out is not None:
        proc = _chromium(exe, url, ["--dump-dom"], width, height, budget_ms, timeout_s)
        if proc.returncode != 0 or not proc.stdout.strip():
            raise RuntimeError(f"chromium --dump-dom failed (rc={proc.returncode}) for {url}:\n{proc.stderr[-2000:]}")
        Path(dom_out).write_text(proc.stdout)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="page to load, e.g. http://127.0.0.1:5000/#/experiments/1")
    ap.add_argument("--out", required=True, help="PNG file to write")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--budget-ms", type=int, default=15000, help="virtual time the page gets to render")
    ap.add_argument("--chromium", help="chromium executable (default $CHROMIUM, else /usr/bin/chromium)")
    ap.add_argument("--dom-out", help="also write the rendered DOM (HTML) to this file")
    args = ap.parse_args(argv)
    try:
        path = screenshot(args.url, args.out, args.width, args.height, args.budget_ms, args.chromium,
                          dom_out=args.dom_out)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"screenshot_mlflow: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
