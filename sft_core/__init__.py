"""SFT Studio core library: data, models, training, serving, retrieval."""

__version__ = "0.1.0"


class StudioError(Exception):
    """An error caused by user input or state, shown to the user as a message (never a traceback).

    `where` names the file, line, or field at fault when known.
    """

    def __init__(self, message: str, where: str | None = None):
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)
