"""Models by Hugging Face Hub id, from the local cache only (issue 18, item 4).

``--model Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` resolves, as ``from_pretrained(...,
local_files_only=True)`` does, to the cached snapshot folder. Nothing is downloaded: the
commands run where weights already are; an id not in the cache is one line naming the cache
folder and the download command.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# "org/name" as the Hub spells repository ids (letters, digits, - _ .; no leading dot).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def hub_cache_dir() -> Path:
    """The cache ``huggingface_hub`` uses now: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``~/.cache/huggingface/hub`` (read at call time: the library reads it once at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_model(spec: str, *, flag: str = "--model") -> str:
    """A local folder path for ``spec`` when it is a Hub id that is not a local folder;
    anything else (folders, built-in names) unchanged. Raises ``FileNotFoundError`` (one line)
    for a Hub id that is not in the local cache."""
    if Path(spec).exists() or not HUB_ID.match(spec):
        return spec
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return snapshot_download(spec, cache_dir=str(cache), local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise FileNotFoundError(
            f"{flag} {spec}: not a local folder, and not in the local Hugging Face cache "
            f"({cache}); download it first (`hf download {spec}`) or pass a local folder"
        ) from None
