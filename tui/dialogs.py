"""The small modal dialogs every screen shares: confirm, pick one of a list, ask for a path, the actions menu.
Each returns its answer through `dismiss` (None when cancelled); the caller gets it in push_screen's callback."""
from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("y", "yes", "Yes", id="confirm.yes"), Binding("escape,n", "no", "No", id="confirm.no")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no")

    def action_yes(self):
        self.dismiss(True)

    def action_no(self):
        self.dismiss(False)

    @on(Button.Pressed)
    def _pressed(self, e):
        self.dismiss(e.button.id == "yes")


class PickScreen(ModalScreen):
    """One of `items` [(label, value)]; dismisses with the value."""
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="pick.cancel")]

    def __init__(self, title: str, items: list[tuple[str, str]]):
        super().__init__()
        self.title_text, self.items = title, items

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, markup=False)
            yield OptionList(*[Text(label) for label, _ in self.items], id="pick")

    def on_option_list_option_selected(self, e: OptionList.OptionSelected):
        self.dismiss(self.items[e.option_index][1])

    def action_cancel(self):
        self.dismiss(None)


class ExportScreen(ModalScreen):
    """Ask where to export (prefilled with `default`); dismisses with the path, or None."""
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="export.cancel")]

    def __init__(self, question: str, default: str):
        super().__init__()
        self.question, self.default = question, default

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, markup=False)
            yield Input(self.default, id="export-path")
            with Horizontal(classes="buttons"):
                yield Button("Export", id="ok", variant="primary")
                yield Button("Cancel", id="cancel")

    @on(Input.Submitted)
    def _submit(self, e):
        self.dismiss(e.value.strip() or None)

    @on(Button.Pressed)
    def _pressed(self, e):
        self.dismiss(self.query_one(Input).value.strip() if e.button.id == "ok" else None)

    def action_cancel(self):
        self.dismiss(None)


class MenuScreen(ModalScreen):
    """The actions of the current screen as a list: the same commands as the palette."""
    BINDINGS = [Binding("escape", "app.pop_screen", "Close", id="menu.close")]

    def __init__(self, commands):
        super().__init__()
        self.commands = commands

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="menu"):
            yield OptionList(*[Text.assemble(c.title, ("  " + c.help, "dim")) for c in self.commands], id="menu-list")

    def on_option_list_option_selected(self, e: OptionList.OptionSelected):
        cmd = self.commands[e.option_index]
        self.app.pop_screen()
        self.app.call_later(cmd.callback)
