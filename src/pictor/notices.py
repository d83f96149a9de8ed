"""Warnings meant for the person running pictor.

The command line hides other libraries' UserWarnings (deprecations and the like, noise to a user) but
shows these, as "pictor COMMAND: warning: ...": a warning that a README promises must reach the terminal.
"""

from __future__ import annotations


class PictorWarning(UserWarning):
    """Something the user asked for was not done exactly as asked, or may not give what they expect."""
