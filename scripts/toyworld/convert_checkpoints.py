"""Convert legacy ``*.pt`` training checkpoints (torch.save) to ``*.safetensors``.

    python scripts/toyworld/convert_checkpoints.py                  # every *_ckpt*.pt in the cache
    python scripts/toyworld/convert_checkpoints.py path/to/unet_ckpt.pt

The new file is written next to the old one, which is kept. The old file is read with
``torch.load(weights_only=True)`` plus an allow-list of the few numpy types of the RNG state.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, convert_legacy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("paths", type=Path, nargs="*", help=f"checkpoints (default {CACHE}/*_ckpt*.pt)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing .safetensors files")
    args = ap.parse_args()
    paths = args.paths or sorted(CACHE.glob("*_ckpt*.pt"))
    if not paths:
        sys.exit(f"error: no *_ckpt*.pt checkpoints in {CACHE}")
    for path in paths:
        try:
            print(f"{path} -> {convert_legacy(path, overwrite=args.overwrite)}")
        except FileExistsError as e:
            print(f"skipped: {e}")


if __name__ == "__main__":
    main()
