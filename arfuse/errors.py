"""Errors that name the bad value and the fix."""


class ArfuseError(Exception):
    """A user-facing error: its message says what was wrong and what to do instead."""


def did_you_mean(name: str, choices) -> str:
    """A ' Did you mean ...?' suffix for an unknown name, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"
