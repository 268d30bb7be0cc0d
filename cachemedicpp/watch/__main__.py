from cachemedicpp.watch.stage import main

raise SystemExit(main())
