"""Identity conversations: who the model is, in its own words. A JSONL file you are meant to edit.

The project ships a default set (nanochat/data/identity_conversations.jsonl, written by
tools/gen_identity.py). To give your model another name or personality, put your own file at
<base>/data/identity_conversations.jsonl (or $NANOCHAT_DATA_DIR/...), or name one: `identity:/path.jsonl`
in a mixture spec. The format is CustomJSON's (nanochat/tasks/customjson.py).
"""
from __future__ import annotations

from pathlib import Path

from nanochat.tasks.common import find_local
from nanochat.tasks.customjson import CustomJSON

FILENAME = "identity_conversations.jsonl"
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "data" / FILENAME


def identity_path(path=None) -> Path:
    """The file used: `path`, else a user's copy in a data root, else the shipped default."""
    return find_local(FILENAME, path) or DEFAULT_PATH


class Identity(CustomJSON):
    def __init__(self, path=None, **kwargs):
        super().__init__(identity_path(path), **kwargs)
