"""Loading a tokenizer by name or folder, with an error that says what to pass instead when it is not found."""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoTokenizer


def load_pretrained_tokenizer(name_or_path: str, builtin: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained`` whose "not found" error names the flag and the ways to fix it.

    ``builtin`` lists the model names the calling recipe builds in-process (mentioned in the error).
    """
    try:
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        if os.path.isdir(name_or_path):
            raise ValueError(
                f"--model_name_or_path {name_or_path!r}: the folder has no loadable tokenizer ({err}). Save the "
                "tokenizer next to the model (tokenizer.save_pretrained(folder)) or pass the original model id."
            ) from err
        if not isinstance(err, OSError):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        options = [
            "a local folder with the model's config.json and tokenizer files",
            *(f"{name!r} (built in-process)" for name in builtin),
            "a Hub model id" + (" once online (HF_HUB_OFFLINE is set)" if offline else ""),
        ]
        raise ValueError(
            f"--model_name_or_path {name_or_path!r}: no such local folder and not loadable from the Hub cache or "
            f"the Hub. Pass {', or '.join(options)}."
        ) from err
