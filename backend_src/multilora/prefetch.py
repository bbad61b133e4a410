"""Download Hub adapters into `adapter_dir` ahead of traffic, so no request waits on a download.

    python -m multilora.prefetch --adapter-dir DIR [--max-bytes N] ID [ID ...]

IDs are `org/name` or `org/name@revision`. Adapters already present are skipped; each id gets one
summary line (size and time, or the error) and the exit status is 1 if any failed, so a deploy
script can stop before the server starts. The token comes from HF_TOKEN (or `hf auth login`), as
for huggingface_hub; with HF_HUB_OFFLINE=1 only the check that everything is present remains.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .adapters.hub import adapter_bytes, download_adapter, hub_adapter_folder, is_downloaded
from .config import parse_size
from .errors import ConfigError, UserError


def prefetch(adapter_ids: list[str], adapter_dir: Path, max_bytes: int | None = None,
             progress: bool = True) -> list[str]:
    """Fetch each id, printing one line per adapter; returns the ids that failed."""
    failed = []
    bar = tqdm(adapter_ids, desc="adapters", unit="adapter", disable=not progress, file=sys.stderr)
    for adapter_id in bar:
        bar.set_postfix_str(adapter_id)
        start = time.monotonic()
        try:
            already = is_downloaded(hub_adapter_folder(adapter_dir, adapter_id))
            folder = download_adapter(adapter_id, adapter_dir, max_bytes=max_bytes, progress=progress)
        except UserError as exc:
            failed.append(adapter_id)
            tqdm.write(f"failed      {adapter_id}: {exc}", file=sys.stdout)
            continue
        size = adapter_bytes(folder)
        what = "present" if already else "downloaded"
        took = "already in adapter_dir" if already else f"in {time.monotonic() - start:.2f}s"
        tqdm.write(f"{what:<11} {adapter_id}: {size} bytes ({_human(size)}) {took}", file=sys.stdout)
    bar.close()
    return failed


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multilora.prefetch", description=__doc__.splitlines()[0])
    parser.add_argument("adapter_ids", nargs="+", metavar="ID", help="org/name or org/name@revision")
    parser.add_argument("--adapter-dir", type=Path, required=True, help="the server's adapter_dir")
    parser.add_argument("--max-bytes", default=None, metavar="SIZE",
                        help="refuse adapters whose weights are larger: bytes or 512MiB / 2GB (the server's "
                             "max_adapter_bytes)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, only the summary lines")
    args = parser.parse_args(argv)
    try:
        max_bytes = None if args.max_bytes is None else parse_size(args.max_bytes, "max_adapter_bytes")
    except ConfigError as exc:
        parser.error(f"--max-bytes: {exc}")
    failed = prefetch(args.adapter_ids, args.adapter_dir, max_bytes, progress=not args.quiet)
    ready = len(args.adapter_ids) - len(failed)
    print(f"{ready} of {len(args.adapter_ids)} adapters ready in {args.adapter_dir}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
