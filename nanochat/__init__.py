"""nanochat: the headless library (model, tokenizer, data, engine, evals, supervisor, report).

Never imports Textual: the TUI in `tui/` is one consumer of this library among others.
"""
__version__ = "0.1.0"
