from polcore.cli import main

raise SystemExit(main())
