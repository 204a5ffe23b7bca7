from sevconsole.cli import main

raise SystemExit(main())
