from cachemedicpp.lmeval import main

raise SystemExit(main())
