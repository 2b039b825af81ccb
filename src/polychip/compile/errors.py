"""Errors of `polychip compile`."""


class CompileError(ValueError):
    """A user mistake in a compile request (unknown target, impossible mesh, indivisible batch).

    The CLI prints the message on one line and exits 2; the message lists what would be valid."""
