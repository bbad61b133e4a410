"""Fetch a PEFT LoRA adapter from the Hugging Face Hub into `adapter_dir`, as one all-or-nothing step.

Only the two files we serve are fetched (`adapter_config.json`, `adapter_model.safetensors`), both
pinned to the commit the config came from, so a push between the two requests cannot mix versions.
They are downloaded into a hidden temporary folder inside `dest_root` and renamed into place at the
end: `adapter_dir` only ever holds complete adapters, whatever interrupts the download. Every
failure leaves this module as one of our own error types, with a message the operator can act on.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm import tqdm

from ..errors import AdapterLoadError, AdapterNotFoundError, InvalidParameterError, UserError
from ..hub_ids import is_hub_id, match_id
from .files import CONFIG_FILE, WEIGHTS_FILE, check_file_size
from .ids import folder_inside

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
_PARTIAL_PREFIX = ".partial-"  # starts with '.': never a valid adapter id, so never listed as one


class _NoBar(tqdm):
    """huggingface_hub's file bars, switched off: servers download in the background, nobody watches."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def split_hub_id(adapter_id: str) -> tuple[str, str | None]:
    """`org/name[@revision]` -> (repo id, revision or None); anything else is refused, never guessed."""
    if not is_hub_id(adapter_id):
        raise InvalidParameterError(
            "adapter_id", f"{adapter_id!r} is not a Hugging Face Hub adapter id; use 'org/name' or "
                          "'org/name@revision' with letters, digits, '.', '_' and '-'")
    match = match_id(adapter_id)
    return match["repo"], match["revision"]


def hub_adapter_folder(dest_root: Path, adapter_id: str) -> Path:
    """Where `adapter_id` lives under `dest_root`: `org/name`, or `org/name@revision` for a pinned one."""
    split_hub_id(adapter_id)
    return folder_inside(dest_root, adapter_id)  # `org` may be a symlink pointing elsewhere


def is_downloaded(folder: Path) -> bool:
    """Both served files present: what the atomic rename guarantees for anything we downloaded."""
    return all((folder / name).is_file() for name in ADAPTER_FILES)


def adapter_bytes(folder: Path) -> int:
    return sum((folder / name).stat().st_size for name in ADAPTER_FILES if (folder / name).is_file())


def offline_mode() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as set in the environment since."""
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "ON", "YES", "TRUE")


def download_adapter(adapter_id: str, dest_root: Path, *, token: str | None = None,
                     max_bytes: int | None = None, progress: bool = False) -> Path:
    """The local folder of Hub adapter `adapter_id` (`org/name[@revision]`), downloading it if absent.

    `token`: None lets huggingface_hub find one (HF_TOKEN, then `hf auth login`'s file).
    `max_bytes`: refuse adapters whose weights file is larger (the same measure as AdapterManager's
    max_adapter_bytes), before fetching it when the Hub reports its size, and again on disk.
    `progress`: show huggingface_hub's per-file bars.
    A copy already in `dest_root` is returned without any network access, which is also the only
    thing that works when HF_HUB_OFFLINE is set.
    """
    repo_id, revision = split_hub_id(adapter_id)
    dest_root = Path(dest_root)
    folder = hub_adapter_folder(dest_root, adapter_id)
    if is_downloaded(folder):
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise AdapterLoadError(f"adapter '{adapter_id}': {folder} exists but lacks {WEIGHTS_FILE} or "
                               f"{CONFIG_FILE}; remove it to download the adapter again")
    if offline_mode():
        raise AdapterLoadError(f"adapter '{adapter_id}' cannot be downloaded: HF_HUB_OFFLINE is set and the "
                               f"adapter is not in {dest_root} (prefetch it there, or unset HF_HUB_OFFLINE)")

    dest_root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=_PARTIAL_PREFIX, dir=dest_root))
    try:
        try:
            _fetch(repo_id, revision, adapter_id, partial, token, max_bytes, progress)
        except UserError:
            raise
        except Exception as exc:  # huggingface_hub and its HTTP client raise many unrelated types
            raise _hub_error(adapter_id, repo_id, revision, token, dest_root, exc) from exc
        shutil.rmtree(partial / ".cache", ignore_errors=True)  # huggingface_hub's local_dir bookkeeping
        check_file_size(adapter_id, WEIGHTS_FILE, (partial / WEIGHTS_FILE).stat().st_size, max_bytes)
        return _move_into_place(partial, folder, adapter_id)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already after a successful rename


def _fetch(repo_id: str, revision: str | None, adapter_id: str, into: Path, token: str | None,
           max_bytes: int | None, progress: bool) -> None:
    """Both files of one commit into `into`; the weights only once their announced size is allowed."""
    config_meta = get_hf_file_metadata(hf_hub_url(repo_id, CONFIG_FILE, revision=revision), token=token)
    commit = config_meta.commit_hash or revision  # pin: `main` may move between our requests
    if max_bytes is not None:
        weights_meta = get_hf_file_metadata(hf_hub_url(repo_id, WEIGHTS_FILE, revision=commit), token=token)
        if weights_meta.size is not None:  # X-Linked-Size / Content-Length; else only the on-disk check
            check_file_size(adapter_id, WEIGHTS_FILE, weights_meta.size, max_bytes)
    bar = None if progress else _NoBar
    for name in ADAPTER_FILES:
        hf_hub_download(repo_id, name, revision=commit, local_dir=into, token=token, tqdm_class=bar)


def _move_into_place(partial: Path, folder: Path, adapter_id: str) -> Path:
    """One rename makes the adapter appear whole; a concurrent finisher's copy wins if it was first."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()  # an empty leftover would make the rename fail
    try:
        partial.rename(folder)
    except OSError:
        if is_downloaded(folder):
            return folder
        raise AdapterLoadError(f"adapter '{adapter_id}': cannot move the download into {folder}") from None
    return folder


def _hub_error(adapter_id: str, repo_id: str, revision: str | None, token: str | None, dest_root: Path,
               exc: Exception) -> UserError:
    """Turn whatever huggingface_hub raised into the error kind the caller can act on."""
    where = f"'{repo_id}'" + (f" at revision '{revision}'" if revision else "")

    def needs_token(reason: str) -> AdapterLoadError:
        return AdapterLoadError(f"adapter '{adapter_id}': the Hugging Face Hub refused access to {where} "
                                f"({reason}); a token with access to it is needed (set HF_TOKEN)")

    status = exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else None
    if isinstance(exc, GatedRepoError):
        return needs_token("gated repository: accept its terms on the Hub")
    if isinstance(exc, RepositoryNotFoundError) and status != 401:
        return AdapterNotFoundError(f"unknown adapter '{adapter_id}': no repository {where} on the Hugging Face Hub")
    if status == 401:
        sent = token is not None or _env_token()
        reason = ("401: the token was refused" if sent else
                  "401: no token was sent; the repository is private, gated or does not exist")
        return needs_token(reason)
    if status == 403:
        return needs_token("403: the token lacks permission")
    if isinstance(exc, RevisionNotFoundError):
        return AdapterNotFoundError(f"unknown adapter '{adapter_id}': repository '{repo_id}' has no revision "
                                    f"'{revision or constants.DEFAULT_REVISION}' on the Hugging Face Hub")
    if isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
        return AdapterNotFoundError(f"unknown adapter '{adapter_id}': {where} on the Hugging Face Hub has no "
                                    f"{_missing_file(exc)} (only PEFT LoRA adapters saved as safetensors are served)")
    if isinstance(exc, OfflineModeIsEnabled) or isinstance(exc.__cause__, OfflineModeIsEnabled):
        return AdapterLoadError(f"adapter '{adapter_id}' cannot be downloaded: HF_HUB_OFFLINE is set and the "
                                f"adapter is not in {dest_root}")
    if isinstance(exc, HFValidationError):
        return InvalidParameterError("adapter_id", f"{adapter_id!r} is not a valid Hub repository id ({exc})")
    cause = exc.__cause__ if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ else exc
    return AdapterLoadError(f"adapter '{adapter_id}': could not download {where} from the Hugging Face Hub "
                            f"at {constants.ENDPOINT} ({_describe(cause)})")


def _missing_file(exc: Exception) -> str:
    for name in ADAPTER_FILES:
        if name in str(exc):
            return name
    return " or ".join(ADAPTER_FILES)


def _describe(exc: BaseException) -> str:
    """Type and first line: huggingface_hub's messages run on with request ids and doc links."""
    lines = str(exc).strip().splitlines()
    first = next((line for line in lines if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _env_token() -> bool:
    from huggingface_hub import get_token

    try:
        return get_token() is not None
    except Exception:  # e.g. a failed OIDC exchange: then no usable token was sent either
        return False
