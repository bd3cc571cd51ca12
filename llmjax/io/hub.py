"""A Hugging Face model folder from a command-line name: a local folder as it is, or a hub id fetched to the hub cache.

The rule, so that a missing local folder is reported as one and not looked up on the hub: a name is a hub id when no
such local path exists and it is exactly `owner/name` or `owner/name@revision`, where owner and name are letters,
digits, '.', '_' and '-' not starting with '.' or '-' (a revision is a branch, tag or commit), and `owner` is not a
local folder. Anything else is a local path and must exist: it starts with '/', '.' or '~', has more than one '/',
has no '/' at all, or starts with a folder that exists here (`runs/typo` is a missing run folder, not a hub id).

Only the files llmjax reads are fetched (config and tokenizer JSON, safetensors, tokenizer.model, merges.txt, the chat
template), first from the local hub cache, then online unless HF_HUB_OFFLINE is set.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "merges.txt", "*.jinja"]
_HUB_PART = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
HUB_ID = re.compile(rf"(?P<repo>{_HUB_PART}/{_HUB_PART})(?:@(?P<revision>[^\s@]+))?")
LOCAL_ALTERNATIVE = "--hf /path/to/folder (config.json + *.safetensors)"


class HubError(ValueError):
    """A model name that is neither a local folder nor a model the Hugging Face hub gives (one line, for people)."""


def parse_hub_id(name: str) -> tuple[str, str | None] | None:
    """('owner/name', revision or None) when `name` has the form of a hub id, else None (see the module's rule)."""
    match = HUB_ID.fullmatch(name)
    if match is None or ".." in match["repo"] or Path(match["repo"].split("/")[0]).is_dir():
        return None
    return match["repo"], match["revision"]


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set to 1 / true / yes / on, as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "TRUE", "YES", "ON"}


def resolve_hf_folder(name_or_path: str | Path) -> Path:
    """The local folder holding a Hugging Face model (config.json + safetensors + tokenizer files) for a name given
    on the command line: an existing folder is returned as is; a hub id is fetched (or found in the hub cache).
    Raises HubError, one line naming the problem and the local-folder alternative."""
    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise HubError(f"{name} is a file, not a folder: give the folder holding config.json and *.safetensors")
    hub_id = parse_hub_id(name)
    if hub_id is None:
        raise HubError(f"no such folder: {name} (give a folder of config.json + *.safetensors, or a Hugging Face hub "
                       f"id such as owner/name or owner/name@revision)")
    return fetch_from_hub(*hub_id, name=name)


def _cannot_fetch(name: str, why: str) -> HubError:
    return HubError(f"cannot fetch {name!r} from the Hugging Face hub ({why}); download it elsewhere and pass the "
                    f"local folder: {LOCAL_ALTERNATIVE}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _http_errors() -> tuple[type[BaseException], ...]:
    """httpx's errors (huggingface_hub 1.x talks through httpx; its own errors are OSErrors), if httpx is there."""
    try:
        import httpx
    except ImportError:
        return ()
    return (httpx.HTTPError,)


def fetch_from_hub(repo_id: str, revision: str | None, *, name: str) -> Path:
    """The snapshot folder of `repo_id` at `revision` (default: main): the hub cache's copy, else a download."""
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise _cannot_fetch(name, "huggingface_hub is not installed: pip install 'llmjax[hub]'") from None

    def download(local_files_only: bool) -> Path:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES,
                                                      local_files_only=local_files_only))

    try:
        return download(local_files_only=True)
    except (OSError, ValueError):  # not in the cache (LocalEntryNotFoundError), or a cache it cannot read
        pass
    if hub_offline():
        raise _cannot_fetch(name, "offline: HF_HUB_OFFLINE is set and the model is not in the local hub cache")
    try:
        return download(local_files_only=False)
    except errors.RevisionNotFoundError:
        raise _cannot_fetch(name, f"{repo_id} has no revision {revision!r}") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as error:
        why = f"{repo_id} is not on the hub, or is private or gated (log in with `hf auth login`): {_first_line(error)}"
        raise _cannot_fetch(name, why) from None
    except (OSError, ValueError, *_http_errors()) as error:  # no network, hub unreachable
        raise _cannot_fetch(name, f"offline or unreachable: {_first_line(error)}") from None
