"""The one error type of checkpoint loading and saving (shared by ``io`` and ``distributed``)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or loaded: corrupted, incomplete, unsafe or for another model.

    The message is one line naming the file; the command line prints it and exits with status 1.
    """
