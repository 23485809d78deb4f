"""The documentation table of a settings dataclass, and its place in a Markdown file."""

from __future__ import annotations

from autoglm_settings.declare import settings


def markdown_table(cls: type, prefix: str, *, file_keys: bool = False) -> str:
    """One row per setting: flags, environment variable, (file key,) default, meaning."""
    head = ["Flag", "Environment", *(["File key"] if file_keys else []), "Default", "Meaning"]
    rows = [head, ["---"] * len(head)]
    for s in settings(cls):
        flags = ", ".join(f"`{flag}`" for flag in s.flags) or "(environment only)"
        if s.kind is bool and s.flags:
            flags += f" / `--no-{s.flag[2:]}`"
        shown = s.shown_default
        rows.append([flags, _environment(s, prefix),
                     *([f"`{s.label}`"] if file_keys else []),
                     shown.replace("|", "\\|") if shown else "", _meaning(s)])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"


def _environment(s, prefix: str) -> str:
    text = f"`{s.env(prefix)}`"
    if s.meta.deprecated_env:
        text += " (deprecated: " + ", ".join(f"`{old}`" for old in s.meta.deprecated_env) + ")"
    return text


def _meaning(s) -> str:
    text = s.meta.help.replace("|", "\\|")
    if s.meta.choices:
        text += " (" + ", ".join(f"`{c}`" for c in s.meta.choices) + ")"
    return text


def begin_marker(tag: str) -> str:
    return f"<!-- generated: {tag} -->\n"


def end_marker(tag: str) -> str:
    return f"<!-- end generated: {tag} -->\n"


def replace_block(text: str, tag: str, body: str) -> str:
    """`text` with what stands between the markers named `tag` replaced by `body`."""
    begin, end = begin_marker(tag), end_marker(tag)
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"markers for {tag!r} are missing: {begin.strip()} ... {end.strip()}")
    return text[:start + len(begin)] + body + text[stop:]
