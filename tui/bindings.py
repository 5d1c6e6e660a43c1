"""Key bindings: every binding has an id (`screen.action`) the user can remap in tui.toml's [tui.keys].

This module knows no screen: the app hands it the classes whose bindings count, so the help screen and
the app can both use it without importing each other.
"""
from __future__ import annotations

from textual.app import App
from textual.binding import Binding

FORBIDDEN_KEYS = ("ctrl+b", "ctrl+s", "ctrl+j", "ctrl+h")  # tmux prefix, XOFF, newline, backspace

APP_BINDINGS = [
    Binding("f1,question_mark", "help", "Help", id="app.help"),
    Binding("m", "menu", "Menu", id="app.menu"),
    Binding("exclamation_mark", "alerts", "Alerts", id="app.alerts"),
    Binding("f2", "next_theme", "Theme", id="app.theme", show=False),
    Binding("f6", "serve", "Serve", id="app.serve", show=False),
    Binding("ctrl+q", "quit", "Quit", id="app.quit", priority=True),
]


def binding_ids(classes) -> dict[str, tuple[str, str, str]]:
    """{binding id: (where, default keys, description)} over the BINDINGS of `classes`."""
    out = {}
    for cls in classes:
        for b in cls.BINDINGS:
            if isinstance(b, Binding) and b.id:
                out[b.id] = (cls.__name__, b.key, b.description)
    return out


def check_keymap(keys: dict[str, str], ids) -> str | None:
    """A one-line error for unknown binding ids or swallowed keys in a [tui.keys] table, else None."""
    unknown = set(keys) - set(ids)
    if unknown:
        return (f"unknown binding id(s) in [tui.keys]: {', '.join(sorted(unknown))}; "
                "see the help screen (F1) or docs/tui.md for the ids")
    bad = sorted(f"{bid} = {k!r}" for bid, k in keys.items() if set(k.split(",")) & set(FORBIDDEN_KEYS))
    if bad:
        return (f"[tui.keys] {', '.join(bad)}: terminals or tmux swallow {', '.join(FORBIDDEN_KEYS)}; "
                "pick another key")
    return None


def current_keys(app: App, binding_id: str, default: str) -> str:
    """The keys a binding has now: the user's remapping if any, else its default."""
    return app._keymap.get(binding_id, default)  # Textual keeps the keymap private; read it only here
