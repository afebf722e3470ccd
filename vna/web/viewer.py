"""The OHIF viewer (npm ``@ohif/app``, whose tarball carries a built ``dist/``), served under ``/viewer/``.

``make install`` fetches the pinned tarball with ``npm pack`` into ``.cache/ohif``
and runs ``python -m vna.web.viewer prepare <tarball> <dir>``, which unpacks
``package/dist`` and makes it work under ``/viewer/`` (the build expects to be
served at ``/``: absolute paths in index.html, the webpack public path, font
URLs in CSS) with an ``app-config.js`` whose DICOMweb data source is this
server's ``/dicomweb``. Without the prepared viewer, ``/viewer/`` answers 503
with how to get it; the rest of vna runs unchanged.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Sequence

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from vna.config import Config, WebConfig

__all__ = ["viewer_dir", "routes", "prepare", "APP_CONFIG", "main"]

#: Where ``make install`` puts the prepared viewer (next to the source tree).
DEFAULT_DIR = Path(__file__).resolve().parents[2] / ".cache" / "ohif" / "viewer"

APP_CONFIG = """/** vna: OHIF reads this server's DICOMweb at /dicomweb (written by vna.web.viewer prepare). */
window.config = {
  name: 'vna',
  routerBasename: '/viewer',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 3,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  groupEnabledModesFirst: true,
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 25 },
  showErrorDetails: 'always',
  defaultDataSourceName: 'vna',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'vna',
      configuration: {
        friendlyName: 'vna archive',
        name: 'vna',
        wadoUriRoot: window.location.origin + '/dicomweb',
        qidoRoot: window.location.origin + '/dicomweb',
        wadoRoot: window.location.origin + '/dicomweb',
        qidoSupportsIncludeField: true,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: false,
        bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""

_MISSING = """<!doctype html><html><head><meta charset="utf-8"><title>vna: viewer not installed</title></head>
<body><h1>The OHIF viewer is not installed</h1>
<p>vna serves the OHIF web viewer here once it has been fetched. On the machine running vna, with Node.js and
npm installed (Debian: <code>apt-get install nodejs npm</code>), run <code>make install</code> in the vna
checkout (it runs <code>npm pack @ohif/app</code> and prepares it under <code>.cache/ohif/viewer</code>),
or point <code>web.viewer_dir</code> at a prepared copy, then restart vna.</p>
<p>DICOMweb itself works without it: <a href="/dicomweb/studies">/dicomweb/studies</a>.</p></body></html>
"""


def viewer_dir(web: WebConfig, cfg: Config) -> Path:
    """The prepared viewer's directory (``web.viewer_dir``, else the one ``make install`` prepared)."""
    return cfg.resolve(web.viewer_dir) if web.viewer_dir else DEFAULT_DIR


def routes(root: Path) -> list[Route]:
    """``/viewer`` and ``/viewer/{path}``: files of the build, anything else its index.html (client routes)."""
    base = root.resolve()

    async def redirect(_request: Request) -> Response:
        return RedirectResponse("/viewer/", status_code=307)

    async def serve(request: Request) -> Response:
        index = base / "index.html"
        if not index.is_file():
            return HTMLResponse(_MISSING, status_code=503)
        rel = str(request.path_params.get("path", ""))
        target = (base / rel).resolve()
        if rel and target.is_relative_to(base) and target.is_file():
            cache = "no-cache" if target.name in ("index.html", "app-config.js") else "public, max-age=86400"
            return FileResponse(target, headers={"Cache-Control": cache})
        return FileResponse(index, headers={"Cache-Control": "no-cache"})

    return [Route("/viewer", redirect, methods=["GET"]),
            Route("/viewer/{path:path}", serve, methods=["GET", "HEAD"])]


def _rewrite(path: Path, rules: list[tuple[str, str]]) -> None:
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    for pattern, repl in rules:
        text = re.sub(pattern, repl, text)
    path.write_text(text, encoding="utf-8", errors="surrogateescape")


def prepare(tarball: Path, out: Path, prefix: str = "/viewer/") -> None:
    """Unpack the OHIF tarball's ``package/dist`` into ``out`` (replaced atomically), rewritten for ``prefix``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=".viewer-"))
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
            if not members:
                raise SystemExit(f"{tarball}: no package/dist in this tarball (not an @ohif/app package?)")
            tar.extractall(work, members=members, filter="data")
        dist = work / "package" / "dist"
        _rewrite(dist / "index.html", [(r'(href|src|content)="/(?!/)', rf'\1="{prefix}'),
                                       (r'window\.PUBLIC_URL="/"', f'window.PUBLIC_URL="{prefix}"')])
        for js in dist.glob("*.js"):
            _rewrite(js, [(r'__webpack_require__\.p = "/"', f'__webpack_require__.p = "{prefix}"'),
                          (r'"/assets/', f'"{prefix}assets/')])
        for manifest in (dist / "manifest.json", dist / "assets" / "manifest.webapp"):
            if manifest.is_file():
                _rewrite(manifest, [(r'"/(?!/)', f'"{prefix}')])
        for css in dist.glob("*.css"):
            _rewrite(css, [(r"url\(/(?!/)", f"url({prefix}")])
        (dist / "app-config.js").write_text(APP_CONFIG, encoding="utf-8")
        (dist / "VNA_PREPARED").write_text(f"{tarball.name}\n", encoding="utf-8")
        old = out.with_name(out.name + ".old")
        if out.exists():
            out.rename(old)
        dist.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vna.web.viewer prepare TARBALL DIR``."""
    p = argparse.ArgumentParser(prog="python -m vna.web.viewer")
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="unpack an @ohif/app tarball for serving under /viewer/")
    prep.add_argument("tarball", type=Path)
    prep.add_argument("out", type=Path)
    args = p.parse_args(argv)
    prepare(args.tarball, args.out)
    print(f"OHIF viewer prepared in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
