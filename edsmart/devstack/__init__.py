"""Development-only tooling, kept out of the runtime package: ``python -m edsmart.devstack run``
or ``... test`` (see ``cli``), and the mail catcher the stack runs (``mailcatcher``).

Nothing is imported here, so ``python -m edsmart.devstack.mailcatcher`` runs that module fresh.
"""
