from cachemedicpp.plots.stage import main

raise SystemExit(main())
