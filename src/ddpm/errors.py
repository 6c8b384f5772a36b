"""The one exception type for a user's mistake.

Anything a user can get wrong (a file, a field, a value) raises `UserError` with one line that
says what is wrong, where, and what to do. The CLI prints that line and exits with status 2;
no traceback reaches the user for their own mistake. It subclasses ValueError so library
callers can catch it as the ordinary Python error for a bad value. (An option that is not one of
its valid values is checked by `config.Choice.parse`, which lists them.)
"""


class UserError(ValueError):
    pass
