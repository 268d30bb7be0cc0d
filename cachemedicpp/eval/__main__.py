from cachemedicpp.eval.stage import main

raise SystemExit(main())
