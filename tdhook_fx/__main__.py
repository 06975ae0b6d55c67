"""`python -m tdhook_fx ...`: the command line (see tdhook_fx.cli)."""

from tdhook_fx.cli import main

raise SystemExit(main())
