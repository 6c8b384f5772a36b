"""The one exception type for a user's mistake.

Anything a user can get wrong (a file, a field, a value) raises `UserError` with one line that
says what is wrong, where, and what to do. The CLI prints that line and exits with status 2;
no traceback reaches the user for their own mistake. It subclasses ValueError so library
callers can catch it as the ordinary Python error for a bad value.
"""


class UserError(ValueError):
    pass


def check_choice(field: str, value, choices) -> None:
    """Raise a UserError naming the field, the value and every valid choice."""
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise UserError(f"{field}={value!r} is not valid; choose one of: {valid}")
