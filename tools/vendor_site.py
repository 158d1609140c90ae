"""Make the site `asv publish` wrote self-contained: copy the JavaScript/CSS it loads from public
CDNs into html/vendor/ (the same releases, from the npm registry via `npm pack`) and point
index.html at those copies, so html/ served from a clone needs no internet.

    python3 tools/vendor_site.py [HTML_DIR]     # default html/

asv 0.6.6's index.html loads jQuery, flot, bootstrap, stupidtable and blueimp-md5 from CDNs;
the `integrity` attributes are dropped because cdnjs serves its own minified builds, which are
not byte-identical to npm's files. Packages are cached in ~/.cache/esmflash-npm.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

# CDN files of asv 0.6.6's index.html that are not on cdn.jsdelivr.net/npm, as (npm spec, path).
CDN_TO_NPM = {
    "https://code.jquery.com/jquery-3.3.1.min.js": ("jquery@3.3.1", "dist/jquery.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.min.js": ("flot@0.8.3", "jquery.flot.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.time.min.js": ("flot@0.8.3", "jquery.flot.time.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.selection.min.js": ("flot@0.8.3", "jquery.flot.selection.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.categories.min.js": ("flot@0.8.3", "jquery.flot.categories.js"),
    # stupidtable 1.0.1 was never published to npm; 1.1.3 has the same $.fn.stupidtable API.
    "https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js": ("stupid-table-plugin@1.1.3", "stupidtable.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js": ("blueimp-md5@2.19.0", "js/md5.min.js"),
}
JSDELIVR_NPM = re.compile(r"^https://cdn\.jsdelivr\.net/npm/((?:@[^/]+/)?[^/@]+@[^/]+)/([^?#]+)")
EXTERNAL = re.compile(r'<(?:script[^>]*\ssrc|link[^>]*\shref)="(https?://[^"]+)"')
DEFAULT_CACHE = Path.home() / ".cache" / "esmflash-npm"


def npm_source(url: str) -> tuple[str, str] | None:
    """(npm spec, file path in the package) serving a CDN URL of the asv site, or None."""
    if url in CDN_TO_NPM:
        return CDN_TO_NPM[url]
    match = JSDELIVR_NPM.match(url)
    return (match.group(1), match.group(2)) if match else None


def npm_package(spec: str, cache: Path) -> Path:
    """The unpacked npm package `spec` (e.g. jquery@3.3.1) under cache/, fetched with `npm pack`."""
    dest = cache / spec.replace("/", "_")
    if not (dest / "package").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is needed to fetch the site's JavaScript libraries")
        cache.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([npm, "pack", "--silent", "--pack-destination", str(cache), spec],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"npm pack {spec} failed: {proc.stderr.strip()[-500:]}")
        with tarfile.open(cache / proc.stdout.strip().splitlines()[-1]) as tar:
            # filter="data" (safe extraction) exists from Python 3.11.4 / 3.10.12 on.
            tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return dest / "package"


def vendor(html_dir: Path, cache: Path = DEFAULT_CACHE) -> list[str]:
    """Copy every CDN file index.html loads into html_dir/vendor/ and rewrite its URL; returns
    the vendored paths. Raises if a URL has no npm source (nothing is rewritten then)."""
    index = html_dir / "index.html"
    text = index.read_text()
    urls = sorted(set(EXTERNAL.findall(text)))
    unknown = [u for u in urls if npm_source(u) is None]
    if unknown:
        raise RuntimeError(f"no npm source known for {unknown}")
    local = {}
    for url in urls:
        spec, path = npm_source(url)
        target = Path("vendor") / spec.replace("/", "_") / path
        (html_dir / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(npm_package(spec, cache) / path, html_dir / target)
        local[url] = target.as_posix()
    for url, target in local.items():
        text = text.replace(f'"{url}"', f'"{target}"')
    text = re.sub(r'\s+integrity="[^"]*"', "", text)
    text = re.sub(r'\s+crossorigin="[^"]*"', "", text)
    index.write_text(text)
    return list(local.values())


if __name__ == "__main__":
    site = Path(sys.argv[1] if len(sys.argv) > 1 else "html")
    try:
        files = vendor(site)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"vendor_site: {e}; {site}/index.html still loads its libraries from CDNs", file=sys.stderr)
        sys.exit(1)
    print(f"vendor_site: {len(files)} files in {site}/vendor/, index.html loads no CDN")
