from cachemedicpp.sweep.runner import main

raise SystemExit(main())
