"""Planner errors."""


class PlanError(ValueError):
    """A user mistake in a fleet file, record or CLI option: one line naming file, line and field."""
