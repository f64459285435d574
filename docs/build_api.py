"""Build the API reference (HTML) from fastlora's docstrings with pdoc; any pdoc warning is an error.

    pip install -e ".[docs]" && python docs/build_api.py [OUT_DIR]      (default: docs/_build/api)

The reference covers what ``import fastlora`` exposes (its ``__all__``). CI builds it on every run.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pdoc
import pdoc.render


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else Path(__file__).parent / "_build" / "api").resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)     # not the repository root: there pdoc would also see the folder fastlora/ and warn
    # warnings issued by pdoc itself (unresolvable names, bad annotations, failed imports) stop the build;
    # warnings that the imported libraries raise on import (torch, triton) are theirs and stay warnings
    warnings.filterwarnings("error", module=r"pdoc(\.|$)")
    pdoc.render.configure(docformat="google", show_source=False, footer_text="fastlora")
    pdoc.pdoc("fastlora", output_directory=out)
    pages = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.html"))
    print(f"API reference: {len(pages)} pages in {out}: {', '.join(pages)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
