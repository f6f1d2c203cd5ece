from leptonfl.cli import main

raise SystemExit(main())
