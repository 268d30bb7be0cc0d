from cachemedicpp.stability.stage import main

raise SystemExit(main())
