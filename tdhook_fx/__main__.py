"""`python -m tdhook_fx ...`: the command line (see tdhook_fx.shipping.cli)."""

from tdhook_fx.shipping.cli import main

raise SystemExit(main())
