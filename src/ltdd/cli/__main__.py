"""``python -m ltdd.cli``: the ``ltdd`` command."""

from . import main

main()
