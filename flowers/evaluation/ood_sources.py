"""Build the out-of-distribution photo set from a Debian package: real non-flower photographs.

    python -m flowers.evaluation.ood_sources --out ~/.cache/flowers/ood-photos

The photos come from `gcompris-qt-data` (the data of GCompris, KDE's educational suite), which
ships them inside Qt resource bundles (`.rcc`): photographs of animals, monuments, tools, fish,
renewable-energy plants and household objects, most of them from Wikimedia Commons. The script
uses the installed package when there is one (`/usr/share/gcompris-qt/rcc`), else downloads the
`.deb` with `apt-get download` (no root needed) and unpacks it with `dpkg-deb -x`. It reads each
bundle with a small parser of the documented `.rcc` format, keeps the listed folders, drops
everything that may show a flower (by name: butterflies, bees and caterpillars are usually
photographed on one) and the fish illustrations (paintings, not photos), and writes the images
unchanged with `SOURCES.json`: one record per file with package, version, path inside the
package, copyright holder, licence and origin as `debian/copyright` states them.

Nothing is committed: the set is rebuilt from the package on any machine (same version, same files).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE = "gcompris-qt-data"
INSTALLED = Path("/usr/share/gcompris-qt/rcc")
COPYRIGHT = Path("usr/share/doc/gcompris-qt-data/copyright")
# bundle -> folders inside it whose .webp files are photographs (checked by eye: docs/robustness.md)
SELECTION: dict[str, tuple[str, ...]] = {
    "erase": ("erase/resource/",),
    "explore_monuments": ("explore_monuments/resource/",),
    "explore_world_animals": ("explore_world_animals/resource/animals/",),
    "explore_farm_animals": ("explore_farm_animals/resource/animals/",),
    "categorization": tuple(f"categorization/resource/images/{c}/" for c in
                            ("fishes", "monuments", "others", "renewable", "tools")),
}
# a name that may show a flower, or an illustration rather than a photograph
EXCLUDE_NAMES = re.compile(r"flower|rose|tulip|daisy|lily|sunflower|orchid|poppy|lotus|plant|bloom|garden|"
                           r"butterfly|bee\b|bee\.|caterpillar|leaf|tree|forest|meadow|field", re.I)
EXCLUDE_AUTHORS = ("Duane Raver",)  # the US Fish and Wildlife Service fish paintings
EXCLUDE_FILES = ("pika.webp",)  # checked by eye: red flowers beside the animal


def rcc_files(data: bytes) -> dict[str, bytes]:
    """Files of a Qt resource bundle (`rcc` binary format, versions 1-3; zlib-compressed entries
    are inflated). Raises ValueError on anything else."""
    if data[:4] != b"qres":
        raise ValueError("not a Qt resource bundle (no 'qres' magic)")
    version, tree, payload, names = struct.unpack(">IIII", data[4:20])
    entry = 14 if version == 1 else 22  # version 2+ adds an 8-byte modification time

    def name(off: int) -> str:
        (n,) = struct.unpack(">H", data[names + off:names + off + 2])
        return data[names + off + 6:names + off + 6 + 2 * n].decode("utf-16-be")

    out: dict[str, bytes] = {}
    stack = [(0, "")]
    while stack:
        i, prefix = stack.pop()
        e = tree + i * entry
        noff, flags = struct.unpack(">IH", data[e:e + 6])
        nm = name(noff) if i else ""
        if flags & 2:  # a directory: its children are contiguous entries
            count, first = struct.unpack(">II", data[e + 6:e + 14])
            stack += [(first + c, f"{prefix}{nm}/" if i else "") for c in range(count)]
            continue
        (off,) = struct.unpack(">I", data[e + 10:e + 14])
        (size,) = struct.unpack(">I", data[payload + off:payload + off + 4])
        raw = data[payload + off + 4:payload + off + 4 + size]
        if flags & 1:
            raw = zlib.decompress(raw[4:])  # 4-byte uncompressed length, then a zlib stream
        elif flags & 4:
            raise ValueError(f"{prefix}{nm}: zstd-compressed entry (not supported)")
        out[prefix + nm] = raw
    return out


def copyright_stanzas(text: str) -> list[dict[str, str]]:
    """`debian/copyright` (DEP-5) paragraphs that have a `Files:` field, in order."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in para.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
        if "Files" in fields:
            out.append(fields)
    return out


def licence_of(path: str, stanzas: list[dict[str, str]]) -> dict[str, str]:
    """Copyright, licence and comment of the last stanza matching `path` (DEP-5: the last match wins);
    the bundles hold .webp conversions of the .jpg/.png files that debian/copyright names."""
    stem = path.rsplit(".", 1)[0]
    found: dict[str, str] = {}
    for st in stanzas:
        for pattern in st["Files"].split():
            pat_stem = pattern.rsplit(".", 1)[0] if not pattern.endswith("*") else pattern
            if fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(stem, pat_stem):
                found = st
    return {"copyright": found.get("Copyright", ""), "license": found.get("License", ""),
            "origin": found.get("Comment", "")}


def package_root(work: Path) -> tuple[Path, str]:
    """(root of the package's files, version): the installed package, else an unpacked download."""
    version = _installed_version()
    if INSTALLED.is_dir() and version:
        return Path("/"), version
    work.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=work, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise RuntimeError(f"cannot download {PACKAGE} with apt-get ({detail.strip()[:200]}); "
                           f"install it (apt-get install {PACKAGE}) and run again") from None
    deb = next(work.glob(f"{PACKAGE}_*.deb"))
    root = work / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root, deb.name.split("_")[1]


def _installed_version() -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", PACKAGE], capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def build(out_dir: Path, work: Path | None = None) -> list[dict[str, str]]:
    """Write the photographs and `SOURCES.json` into `out_dir`; returns the records."""
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix="flowers-ood-")) if work is None else Path(work)
    try:
        root, version = package_root(tmp)
        rcc_dir = root / str(INSTALLED).lstrip("/")
        stanzas = copyright_stanzas((root / COPYRIGHT).read_text(encoding="utf-8", errors="replace"))
        out_dir.mkdir(parents=True, exist_ok=True)
        records = []
        for bundle, folders in SELECTION.items():
            for inner, data in sorted(rcc_files((rcc_dir / f"{bundle}.rcc").read_bytes()).items()):
                rel = inner.split("gcompris/", 1)[-1]  # src/activities/...
                if not rel.endswith(".webp") or not any(f in rel for f in folders):
                    continue
                lic = licence_of(rel, stanzas)
                base = rel.rsplit("/", 1)[-1]
                if (EXCLUDE_NAMES.search(base) or base in EXCLUDE_FILES
                        or any(a in lic["copyright"] for a in EXCLUDE_AUTHORS)):
                    continue
                name = f"{bundle}__{rel.rsplit('/', 2)[-2]}__{rel.rsplit('/', 1)[-1]}"
                (out_dir / name).write_bytes(data)
                records.append({"file": name, "package": PACKAGE, "version": version, "path": rel, **lic})
        (out_dir / "SOURCES.json").write_text(json.dumps(records, indent=1))
        log.info("%d photos from %s %s in %s", len(records), PACKAGE, version, out_dir)
        return records
    finally:
        if work is None:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write the photos and SOURCES.json into")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        records = build(Path(args.out).expanduser())
    except (RuntimeError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    by_licence: dict[str, int] = {}
    for r in records:
        by_licence[r["license"] or "?"] = by_licence.get(r["license"] or "?", 0) + 1
    print(f"{len(records)} photos in {args.out}: " + ", ".join(f"{k} {v}" for k, v in sorted(by_licence.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
