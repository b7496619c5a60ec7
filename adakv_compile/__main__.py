"""``python -m adakv_compile ...`` = the ``adakv`` command."""
from .cli import main

raise SystemExit(main())
