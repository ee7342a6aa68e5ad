"""Regenerate the Python protobuf/gRPC code in ``nsm/api`` from the ``.proto`` files in ``api/``.

Usage::

    python -m nsm.api.generate          # rewrite nsm/api/*_pb2*.py
    python -m nsm.api.generate --check  # exit 1 if the committed code is stale

The upstream protos use flat imports (``import "connection.proto";``), so protoc emits
``import connection_pb2``; we rewrite those to package-relative imports so the code lives in
``nsm.api`` without touching ``sys.path``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

PROTOS = ("connectioncontext", "connection", "networkservice", "registry")
HERE = Path(__file__).resolve().parent
DEFAULT_API_DIR = HERE.parent.parent / "api"
_FLAT_IMPORT = re.compile(r"^import (\w+_pb2(?:_grpc)?) as (\w+)$", re.MULTILINE)


def _protoc(api_dir: Path, out_dir: Path) -> None:
    from grpc_tools import protoc

    include = str(resources.files("grpc_tools") / "_proto")
    files = [str(api_dir / f"{name}.proto") for name in PROTOS]
    args = [
        "grpc_tools.protoc",
        f"-I{api_dir}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed for {files}")


def _fix_imports(text: str) -> str:
    names = {f"{p}_pb2" for p in PROTOS} | {f"{p}_pb2_grpc" for p in PROTOS}

    def repl(m: re.Match[str]) -> str:
        if m.group(1) in names:
            return f"from nsm.api import {m.group(1)} as {m.group(2)}"
        return m.group(0)

    text = _FLAT_IMPORT.sub(repl, text)
    # .pyi stubs use plain "import x_pb2 as _x_pb2" too, and bare "import x_pb2" lines.
    for n in sorted(names):
        text = re.sub(rf"^import {n}$", f"from nsm.api import {n}", text, flags=re.MULTILINE)
    return text


def generate(api_dir: Path = DEFAULT_API_DIR) -> dict[str, str]:
    """Return {filename: content} of the generated modules."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _protoc(api_dir, out)
        result: dict[str, str] = {}
        for path in sorted(out.iterdir()):
            if path.suffix in (".py", ".pyi"):
                result[path.name] = _fix_imports(path.read_text())
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    parser.add_argument("--api-dir", type=Path, default=DEFAULT_API_DIR)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args(argv)
    files = generate(args.api_dir)
    stale = [n for n, c in files.items() if not (args.out_dir / n).exists()
             or (args.out_dir / n).read_text() != c]
    if args.check:
        if stale:
            print(f"stale generated code: {', '.join(stale)}; run: python -m nsm.api.generate",
                  file=sys.stderr)
            return 1
        return 0
    for name in stale:
        (args.out_dir / name).write_text(files[name])
        print(f"wrote {args.out_dir / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
