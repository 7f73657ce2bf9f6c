from winnow.cli import main

raise SystemExit(main())
