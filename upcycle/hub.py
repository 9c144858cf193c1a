"""Hugging Face hub ids as sources: ``ORG/NAME`` or ``ORG/NAME@REVISION``, resolved through ``huggingface_hub`` and
its cache.

Resolution is ``huggingface_hub.snapshot_download``'s: it honours ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN`` and
``HF_HUB_OFFLINE`` (then only the cache is read), downloads what is missing when online, and falls back to the cache
when the hub cannot be reached. Only the files a model needs are fetched: its config, safetensors weights and
tokenizer files (pickle weights only when the caller accepts them). The snapshot folder's name is the resolved commit,
which the conversion record keeps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]  # config, weights, tokenizer
PICKLE_FILES = ["*.bin"]


@dataclass(frozen=True)
class HubSnapshot:
    repo_id: str
    commit: str  # the resolved revision: always a commit hash, whatever branch or tag was asked for
    path: Path  # the snapshot folder in the cache


def parse_hub_id(source: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``source`` has the form of a hub id, else None."""
    match = HUB_ID.match(source)
    return (match["repo"], match["revision"]) if match else None


def snapshot(source: str, allow_pickle: bool = False) -> HubSnapshot:
    """The cached (downloaded when online and missing) snapshot of the model repository ``source`` names."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hub

    parsed = parse_hub_id(source)
    if parsed is None:
        raise UserError(f"{source!r} is not a hub id; write ORG/NAME or ORG/NAME@REVISION")
    repo_id, revision = parsed
    patterns = MODEL_FILES + (PICKLE_FILES if allow_pickle else [])
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except hub.LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set, so only" if constants.HF_HUB_OFFLINE else "the hub cannot be reached, and"
        raise UserError(
            f"{source} is neither a local path nor in the Hugging Face cache ({constants.HF_HUB_CACHE}): {where} the "
            f"cache is read. Fetch it once online (`hf download {repo_id}"
            f"{f' --revision {revision}' if revision else ''}`) or give a local folder"
        ) from None
    except hub.GatedRepoError:
        raise UserError(f"{repo_id} is gated: accept its terms on the hub and set HF_TOKEN") from None
    except hub.RevisionNotFoundError:
        raise UserError(f"{repo_id} has no revision {revision!r}; give a branch, a tag or a commit hash") from None
    except hub.RepositoryNotFoundError:
        raise UserError(f"no model {repo_id} on the hub (or it is private: set HF_TOKEN)") from None
    except hub.HFValidationError as error:
        raise UserError(f"{source} is not a valid hub id: {error}") from None
    return HubSnapshot(repo_id=repo_id, commit=path.name, path=path)


def cached_commit(repo_id: str, filename: str) -> str | None:
    """The commit of the cached ``filename`` of ``repo_id`` (its ``main``), or None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return Path(found).parent.name if isinstance(found, str) else None
