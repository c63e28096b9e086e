"""``python -m chatrex`` = the ``chatrex`` command."""

from chatrex.cli import main

raise SystemExit(main())
